"""The app's routes, one router per area; ``create_app`` includes them in this order.

- :mod:`~polypseg.web.routers.inference`: ``POST /v1/segment``, ``/v1/explain``, ``/v1/segment-video``
- :mod:`~polypseg.web.routers.status`: ``GET /v1/health``, ``/v1/model``
- :mod:`~polypseg.web.routers.samples`: ``GET /v1/samples``, ``/v1/samples/{name}``, ``/v1/samples/{name}/mask``
- :mod:`~polypseg.web.routers.pages`: ``/``, ``/favicon.ico``, ``/docs`` and the static folders
"""
