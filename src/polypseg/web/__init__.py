"""Web page and HTTP API for polypseg (``polypseg serve``).

>>> from polypseg.web import InferenceService, WebSettings, create_app
>>> service = InferenceService.from_checkpoint("runs/cv1")        # checkpoint or CV run folder
>>> app = create_app(service, WebSettings(token="s3cret"))        # FastAPI app; run with uvicorn
"""

from polypseg.web.app import WebSettings, create_app
from polypseg.web.server import BackgroundServer
from polypseg.web.service import InferenceService, ServiceBusy

__all__ = ["BackgroundServer", "InferenceService", "ServiceBusy", "WebSettings", "create_app"]
