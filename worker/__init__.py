"""Code that runs on worker and fleet hosts without Django: training, evaluation, serving.

Nothing here may import ``django`` or ``apps``; a test enforces it.
"""
