"""The HTTP server: thin routes over `LLM.submit`/`cancel`.

    sock = bind("127.0.0.1", 8000)  # before the model loads: a busy port fails at once
    app = create_app(llm, model_name="smollm2-135m", api_key=None)
    run(app, sock)

Routes: `POST /` (the JittorLLMs/ChatGLM `api.py` shape), `POST /v1/completions` and
`POST /v1/chat/completions` (OpenAI-compatible, `stream: true` as server-sent events),
`GET /v1/models`, `GET /health` (503 until every worker of the plan is alive), `GET
/metrics` (Prometheus text) and `GET /` (the chat page). Errors are OpenAI's shape: 400
for bad input (a prompt too long for the context or the cache included), 401 for a
missing or wrong key, 404 for an unknown model, 413 for a body over the limit, 503 when
the pipeline cannot serve. A client that disconnects cancels its generation.

Files: app (create_app), routes, schemas, responses (OpenAI bodies), streaming (SSE),
bridge (scheduler thread to asyncio), metrics, auth, limits, errors, serving (uvicorn).
"""

from .app import create_app
from .errors import ApiError
from .limits import MAX_BODY_BYTES
from .schemas import ChatRequest, CompletionRequest, SeedRequest
from .serving import BackgroundServer, bind, run

__all__ = ["create_app", "bind", "run", "BackgroundServer", "ApiError", "MAX_BODY_BYTES",
           "ChatRequest", "CompletionRequest", "SeedRequest"]
