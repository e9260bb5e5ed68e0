"""The training loop and its inputs, free of Django.

Import the pieces from their modules: ``config`` is cheap (the API validates with it),
``loop`` pulls in torch and transformers.
"""
