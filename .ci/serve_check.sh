#!/usr/bin/env bash
# The newcomer's path, as the README shows it: `make serve` from the repository root, the chat
# question through `textgen-client --chat`, then Ctrl-C; no tritonserver may be left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
# A process group of its own, as a terminal's foreground job: Ctrl-C signals the whole group.
setsid make serve > "$log" 2>&1 &
job=$!
fail() { echo "serve check: $*"; tail -n 60 "$log"; kill -KILL -- "-$job" 2>/dev/null || true; exit 1; }
for _ in $(seq 900); do
  curl -sf localhost:8000/v2/models/ensemble/ready > /dev/null && break
  kill -0 "$job" 2>/dev/null || fail "make serve exited before it was ready"
  sleep 1
done
curl -sf localhost:8000/v2/models/ensemble/ready > /dev/null || fail "not ready after 900 s"
answer=$(.venv/bin/textgen-client --chat "What is the capital of France?")
echo "textgen-client: $answer"
grep -q "Paris" <<< "$answer" || fail "the answer does not name Paris"
# The README's clients (OpenAI, huggingface_hub, TGI's, LoRAX's) against make serve's front end.
for _ in $(seq 60); do curl -sf localhost:3000/health > /dev/null && break; sleep 1; done
clients=$(.venv/bin/python -c '
import pathlib, re
readme = pathlib.Path("README.md").read_text()
exec(next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import OpenAI" in b))
') || fail "the README's clients failed against make serve's front end"
echo "README clients: $clients"
[ "$(grep -o Paris <<< "$clients" | wc -l)" = 2 ] && [ "$(grep -o Berlin <<< "$clients" | wc -l)" = 3 ] \
  || fail "the README's clients did not print two Paris answers and three Berlin ones"
kill -INT -- "-$job"  # Ctrl-C
for _ in $(seq 120); do kill -0 "$job" 2>/dev/null || break; sleep 1; done
kill -0 "$job" 2>/dev/null && fail "still running 120 s after Ctrl-C"
grep -q "tritonserver exited with code 0" "$log" || fail "the launcher did not report a clean exit"
# The launcher renders into a temporary textgen-repository-* directory.
if pgrep -af "bin/tritonserver .*textgen-repository-"; then fail "a tritonserver process is left"; fi
echo "serve check: passed ($(grep -c . "$log") log lines)"
