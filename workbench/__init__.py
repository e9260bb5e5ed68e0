"""The Django project.

The Celery app is made when Django loads (``apps.core.apps.CoreConfig.ready``) and by
``celery -A workbench``, not on import of this package: ``workbench.client`` is imported
inside notebook kernels, where neither Django nor Celery has any business loading.
"""
