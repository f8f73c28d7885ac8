"""OpenAI- and Anthropic-compatible inference, mapped onto tinkerd's sampler.

The one place that turns a Completions, Chat Completions or Messages request into
sampling requests (prompt tokens + `SamplingParams`) and a `SampleResponse` back into
that API's response or server-sent events. The routes (server/routes/openai.py,
anthropic.py) only authenticate, decode and encode; everything they need from the server
goes through `SamplingBackend`, so these requests join the same sampler batches as
`SamplingClient` requests on that base model.

- common.py: `SamplingBackend`, the request-body base and `parse`, the `model` field,
  chat rendering, `Reply` and `sse`.
- generate.py: stop rules, `Job`, `run` and `Stream` (submit into the shared batch), `Generation`
  (a sampled sequence cut at EOS or a stop string) and its per-token text.
- logprobs.py: token texts and bytes, Chat's and legacy Completions' logprob formats.
- openai.py: Completions and Chat Completions: request models, bodies, SSE chunks.
- anthropic.py: Messages and count_tokens: request models, bodies, events.
"""

from tinkerd.service.inference.anthropic import (
    CountTokensRequest,
    MessagesRequest,
    anthropic_models,
    count_tokens,
    messages,
)
from tinkerd.service.inference.common import Reply, SamplingBackend, parse
from tinkerd.service.inference.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion,
    completion,
    openai_models,
)

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "CountTokensRequest",
    "MessagesRequest",
    "Reply",
    "SamplingBackend",
    "anthropic_models",
    "chat_completion",
    "completion",
    "count_tokens",
    "messages",
    "openai_models",
    "parse",
]
