"""The one table from the service's domain errors to HTTP answers covers every domain error with a 4xx or 5xx of
its own, so no error a client causes falls through to the 500 reserved for the server's own faults."""

import inspect

from mcc_serve import errors
from mcc_serve.runtime import errors as domain


def test_every_domain_error_has_its_status_in_the_table():
    classes = [c for _, c in inspect.getmembers(domain, inspect.isclass) if issubclass(c, domain.ServiceError)]
    assert len(classes) >= 8
    statuses = {c.__name__: errors.status_of(c("x"))[0] for c in classes if c is not domain.ServiceError}
    assert statuses == {
        "DeadlineError": 504,
        "ImageError": 400,
        "ImageTooLargeError": 413,
        "InvalidArgumentError": 422,
        "NotReadyError": 503,
        "QueueFullError": 429,
        "TooManyImagesError": 413,
    }
    assert errors.status_of(domain.ServiceError("a new kind the table lacks"))[0] == 500


def test_retry_after_goes_with_the_answers_a_retry_can_fix():
    assert errors.status_of(domain.QueueFullError("x"))[1] == {"Retry-After": "1"}
    assert errors.status_of(domain.NotReadyError("x"))[1] == {"Retry-After": "1"}
    assert errors.status_of(domain.TooManyImagesError("x"))[1] is None
