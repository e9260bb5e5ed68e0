"""The API's browsable docs page.

Its own module: ``drf_spectacular.views`` imports DRF's generic views, which import the
pagination class named in the settings (``apps.core.api.Pagination``); defined in
``apps.core.api`` it made that import circular.
"""

from __future__ import annotations

from drf_spectacular.views import SpectacularSwaggerSplitView
from rest_framework.renderers import BaseRenderer, JSONRenderer


class ApiDocsView(SpectacularSwaggerSplitView):
    """Swagger UI at /api/v1/docs/ under the Content-Security-Policy: its start-up script is
    served by this view (``?script``), its page styles from a static file, so the page
    needs neither inline scripts nor inline styles."""

    template_name = "api/docs.html"

    def get_renderers(self) -> list[BaseRenderer]:
        # OPTIONS answers the view's metadata, which has no template to render into.
        if self.request.method == "OPTIONS":
            return [JSONRenderer()]
        return list(super().get_renderers())
