"""schemathesis hooks for tests/test_api_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

The fuzzer keeps its own credentials: schemathesis reuses the ids responses answer, so it
finds its own token in ``GET /tokens/`` and its own account in ``GET /users/``, and
revoking that token or deactivating that account (both allowed, both audited) would leave
the rest of the run answering 401. A request that would do either goes to an id that does
not exist instead (a documented 404); every other request goes out as generated.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

# path parameter -> the fuzzer's own value (set by the test)
OWN = {
    "token_id": os.environ.get("FUZZ_OWN_TOKEN_ID", ""),
    "username": os.environ.get("FUZZ_OWN_USERNAME", ""),
}
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.method.upper() not in WRITES or not case.path_parameters:
        return
    for name, own in OWN.items():
        if own and case.path_parameters.get(name) == own:
            case.path_parameters[name] = f"not-{own}"
