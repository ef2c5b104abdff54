"""mcc_serve.protocol extends uvicorn's private HttpToolsProtocol: a uvicorn release that changes what it relies on
fails here, by name, instead of silently dropping the header and slow-client limits."""

import inspect
from importlib.metadata import version

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mcc_serve.protocol import BoundedHttpToolsProtocol

HOOKS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_message_complete",
)
ATTRIBUTES = ("self.loop", "self.transport", "self.cycle", "self.logger")


def test_the_uvicorn_class_it_extends_still_has_what_it_overrides_and_uses():
    where = f"uvicorn {version('uvicorn')}'s HttpToolsProtocol, which mcc_serve/protocol.py extends,"
    for hook in HOOKS:
        assert callable(getattr(HttpToolsProtocol, hook, None)), f"{where} has no {hook}(); update protocol.py"
        assert hook in BoundedHttpToolsProtocol.__dict__, f"protocol.py no longer overrides {hook}; update HOOKS"
    source = inspect.getsource(HttpToolsProtocol)
    for attribute in ATTRIBUTES:
        assert f"{attribute} =" in source, f"{where} no longer sets {attribute}; update protocol.py"
    assert "response_complete" in source, f"{where} no longer tracks response_complete; update protocol.py"
