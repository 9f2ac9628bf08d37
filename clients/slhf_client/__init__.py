"""Python client of the SLHF refinement server (imports nothing from the server, torch or vllm).

```python
from slhf_client import Client

with Client("http://localhost:8000") as client:
    r = client.refine("Explain gravity", rounds=2)
    print(r.leader.text, [x.text for x in r.rounds], r.final)
```
"""

from ._core import RetryPolicy
from .async_client import AsyncClient
from .client import Client
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SLHFClientError,
)
from .types import (
    ChatChoice,
    ChatChunk,
    ChatCompletion,
    ChatUsage,
    LeaderAnswer,
    Model,
    Refinement,
    RefinementTrace,
    Round,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatChoice",
    "ChatChunk",
    "ChatCompletion",
    "ChatUsage",
    "Client",
    "ConflictError",
    "LeaderAnswer",
    "Model",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "Refinement",
    "RefinementTrace",
    "RetryPolicy",
    "Round",
    "SLHFClientError",
    "ServerError",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
