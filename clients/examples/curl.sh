#!/usr/bin/env bash
# The SLHF API with curl. Usage: SLHF_BASE_URL=http://localhost:8000 bash clients/examples/curl.sh
set -euo pipefail
BASE="${SLHF_BASE_URL:-http://localhost:8000}"
BASE="${BASE%/}"
BASE="${BASE%/v1}"
AUTH=()
if [ -n "${SLHF_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer ${SLHF_API_KEY}"); fi
JSON=(-H 'Content-Type: application/json')

echo "# liveness and readiness"
curl -fsS "${AUTH[@]}" "$BASE/health"; echo
curl -fsS "${AUTH[@]}" "$BASE/ready"; echo

echo "# models: <name> (refined) and <name>:leader (no refinement)"
curl -fsS "${AUTH[@]}" "$BASE/v1/models"; echo

echo "# POST /v1/refine: the Leader answer, each Follower round, the final answer"
curl -fsS "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/refine" \
  -d '{"prompt": "Explain gravity", "rounds": 2, "leader": {"max_tokens": 32}, "follower": {"max_tokens": 32}, "seed": 0}'
echo

echo "# refine a given answer"
curl -fsS "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/refine" \
  -d '{"prompt": "Explain gravity", "response": "Things fall down.", "rounds": 1}'
echo

echo "# OpenAI chat completion with the refinement extension"
curl -fsS "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/chat/completions" \
  -d '{"messages": [{"role": "user", "content": "Explain gravity"}], "max_tokens": 32,
       "refinement": {"rounds": 2, "return_trace": true}}'
echo

echo "# streaming every round (Server-Sent Events)"
curl -fsSN "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/chat/completions" \
  -d '{"messages": [{"role": "user", "content": "Explain gravity"}], "max_tokens": 16, "stream": true,
       "refinement": {"rounds": 1, "stream_rounds": true}}'
