"""Stream a refined answer with the OpenAI SDK: the final round only, then every round.

SLHF_BASE_URL=http://localhost:8000 python clients/examples/openai_sdk_stream.py
"""

import os

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

base_url = os.environ.get("SLHF_BASE_URL", "http://localhost:8000").rstrip("/")
client = OpenAI(
    base_url=base_url.removesuffix("/v1") + "/v1",
    api_key=os.environ.get("SLHF_API_KEY", "unused"),
)
model = client.models.list().data[0].id
messages: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a haiku about the sea."}
]

# 1. Standard streaming: earlier rounds run first, the final round's tokens stream as generated.
print("final round: ", end="")
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    stream=True,
    extra_body={"refinement": {"rounds": 2}},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# 2. Every round streams (round 0 = the Leader); each chunk says which round it belongs to.
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"refinement": {"rounds": 2, "stream_rounds": True}},
)
current = None
for chunk in stream:
    if not chunk.choices and chunk.usage:  # the last chunk: usage of every round
        print(f"\nusage: {chunk.usage.total_tokens} tokens")
        continue
    choice = chunk.choices[0]
    round_ = (choice.model_extra or {}).get("round")
    if choice.delta.content:
        if round_ != current:
            current = round_
            print(f"\n[round {round_}] ", end="")
        print(choice.delta.content, end="", flush=True)
