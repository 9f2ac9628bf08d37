"""Chat with the SLHF server through the official OpenAI SDK, unmodified.

    SLHF_BASE_URL=http://localhost:8000 python clients/examples/openai_sdk_chat.py

The model id `<name>` refines with the model's default rounds, `<name>:leader` does not refine;
`extra_body={"refinement": {...}}` sets the rounds (and more) per request.
"""

import os

from openai import OpenAI

base_url = os.environ.get("SLHF_BASE_URL", "http://localhost:8000").rstrip("/")
client = OpenAI(
    base_url=base_url.removesuffix("/v1") + "/v1",
    api_key=os.environ.get("SLHF_API_KEY", "unused"),  # any string when the server has no keys
)

model = client.models.list().data[0].id
print(f"model: {model}")

# 1. A plain chat completion: the answer is the final round.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Explain gravity in one sentence."}],
    max_tokens=32,
    seed=0,
)
print(f"\nrefined answer: {r.choices[0].message.content!r}")

# 2. The refinement extension: 2 rounds, with every round's text in the response.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Explain gravity in one sentence."}],
    max_tokens=32,
    seed=0,
    extra_body={"refinement": {"rounds": 2, "return_trace": True}},
)
trace = (r.choices[0].model_extra or {})["refinement"]  # our extension field
print(f"\nleader:  {trace['leader']['text']!r}")
for rnd in trace["rounds"]:
    print(f"round {rnd['round']}: {rnd['text']!r}")
by_role = (r.usage.model_extra or {}).get("by_role") if r.usage else None
print(f"stopped: {trace['stopped_reason']}; usage by role: {by_role}")

# 3. Refine an answer that came from somewhere else (any model, a human, ...).
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Explain gravity in one sentence."}],
    max_tokens=32,
    extra_body={"refinement": {"rounds": 1, "response": "Things fall down."}},
)
print(f"\nrefined a given answer: {r.choices[0].message.content!r}")
