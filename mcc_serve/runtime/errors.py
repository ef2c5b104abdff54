"""What can go wrong in classifying a request, in the service's own terms.

Every transport maps these to its own answer in one table (HTTP: ``mcc_serve.errors``); none of them carries an
HTTP status. The message is written for the client: it names the problem and what to do.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service cannot answer; the message is safe to show the client."""


class ImageError(ServiceError, ValueError):
    """An input that is not a usable image: empty, not a format Pillow reads, corrupt or truncated."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than the limit: refused from its header, before its pixels are decoded."""


class InvalidArgumentError(ServiceError):
    """An argument of the request itself is out of range (``top_k``)."""


class TooManyImagesError(ServiceError):
    """One request holds more images than a request may carry or than the queue can ever hold; a retry cannot help."""


class QueueFullError(ServiceError):
    """The queue has no room for the request now; retry later."""


class DeadlineError(ServiceError, TimeoutError):
    """No answer within the request's deadline; what has not run yet never will."""


class NotReadyError(ServiceError):
    """The model is still warming up, or the service is shutting down; retry shortly."""
