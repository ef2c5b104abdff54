"""schemathesis over the served OpenAPI document: no 5xx and answers that conform to it, on a real server."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import Server

AUTH = {"Authorization": "Bearer fuzz-key"}


@pytest.mark.slow
def test_no_5xx_and_the_answers_conform_to_the_document(bundle):
    srv = Server(bundle, "--max-delay-ms", "0", env={"MCC_API_KEY": "fuzz-key"})  # the document's bearer auth
    try:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8  # predict, v2 health, metadata, ready, infer, metrics, ...
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def fuzz(case):
                # NOTE: "schema-valid data is accepted" is left out: no schema says "the bytes of a decodable image",
                # so random files that fit the document rightly get 400
                case.call_and_validate(base_url=srv.url, headers=AUTH, excluded_checks=[positive_data_acceptance])

            fuzz()
        assert srv.proc.poll() is None  # still up
    finally:
        srv.stop()
