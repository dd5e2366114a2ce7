"""Property-based fuzzing of the live API (schemathesis): uvicorn on loopback, real Redis, a
dispatcher and the sandbox (`harness.apistack`). For every operation of the served OpenAPI
document, generated requests (valid and invalid) with an operator-wide admin key never get a 5xx,
and every answer matches the document (status code, content type, body schema).

Bounded: `MAX_EXAMPLES` per operation (the whole run takes well under a minute).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from harness.apistack import ApiStack, api_stack

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def stack() -> Iterator[ApiStack]:
    with api_stack() as s:
        yield s


def fuzz_operation(operation: Any, base_url: str, headers: dict[str, str], ran: dict[str, int]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @given(operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def fuzz(case: Any) -> None:
        ran[label] = ran.get(label, 0) + 1
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)

    fuzz()


def test_no_server_error_and_answers_match_the_document(stack: ApiStack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "operations the fuzzer cannot read from the document"
    assert len(operations) >= 15
    ran: dict[str, int] = {}
    for operation in operations:
        fuzz_operation(operation, stack.url, headers, ran)
    print(f"fuzzed {len(ran)} operations, {sum(ran.values())} requests")
    assert len(ran) == len(operations)
