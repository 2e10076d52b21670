"""A small OpenAI-compatible server for the lab model: the engine behind HTTP, tokens streamed as they come.

    python 15_inference_stacks/serve.py            # the full lab model on http://127.0.0.1:8000
    python 15_inference_stacks/serve.py --quick    # the quick lab model (trained in seconds when not cached)

Endpoints:
  GET  /                  a page: type a prompt, set 05's sampling parameters, watch the tokens stream
  GET  /health            status, model, running / waiting requests, KV blocks in use
  GET  /v1/models         the one model served (OpenAI's list format)
  POST /v1/completions    OpenAI's completions API; "stream": true sends server-sent events
                          (`data: {chunk}` per token, then `data: [DONE]`), else one JSON answer.
                          Extensions beside OpenAI's fields: top_k, min_p, repetition_penalty.

One worker thread owns the engine and steps it while there is work; HTTP handlers submit requests to it
and receive TokenEvents through an asyncio queue per request. A client that disconnects cancels its
request, which returns its KV blocks. A bad request gets HTTP 400 with an OpenAI-style error naming the
parameter: {"error": {"message": ..., "type": "invalid_request_error", "param": ...}}.

Contents: EngineWorker, CompletionRequest, create_app, main.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import argparse
import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from engine import Engine
from sampler import PRESETS, SamplingConfig

PAGE = pathlib.Path(__file__).resolve().parent / "page.html"


class EngineWorker:
    """The engine on its own thread: submit() and cancel() from any thread, events delivered to the
    caller's asyncio loop. A lock keeps submit/cancel between steps, never inside one."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.listeners: dict = {}  # request id -> (event loop, asyncio.Queue)
        self.served = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list, max_tokens: int, sampling: SamplingConfig, seed, queue: asyncio.Queue) -> int:
        with self.lock:
            request_id = self.engine.submit(prompt, max_tokens, sampling, seed)
            self.listeners[request_id] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return request_id

    def cancel(self, request_id: int) -> None:
        with self.lock:
            self.listeners.pop(request_id, None)
            self.engine.cancel(request_id)

    def status(self) -> dict:
        with self.lock:
            cache = self.engine.cache
            return {"running": len(self.engine.running), "waiting": len(self.engine.waiting),
                    "blocks_used": cache.blocks_used, "blocks_total": cache.num_blocks,
                    "block_size": cache.block_size, "requests_served": self.served,
                    "preemptions": self.engine.preemptions}

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stopped:
            with self.lock:
                events = self.engine.step() if self.engine.has_work else None
                targets = [(event, self.listeners.get(event.request_id)) for event in events or ()]
                for event in events or ():
                    if event.finished:
                        self.listeners.pop(event.request_id, None)
                        self.served += 1
            for event, target in targets:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            if events is None:
                self.wake.wait(timeout=0.5)
                self.wake.clear()


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions body (the fields this server supports) plus 05's other sampling knobs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def create_app(model, vocab, model_name: str, max_batch_size: int = 32, block_size: int = 16,
               max_tokens_limit: int = 1024) -> FastAPI:
    """The FastAPI app serving `model` (a MiniFormer) with a character vocabulary (00_utils' CharVocab)."""
    worker = EngineWorker(Engine(model, max_batch_size=max_batch_size, block_size=block_size))
    context_length = model.config.context_length
    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.stop()

    app = FastAPI(title="LLM Lab inference server", lifespan=lifespan)
    app.state.worker = worker
    page = PAGE.read_text().replace("__MODEL__", model_name).replace("__PRESETS__", json.dumps(
        {name: {"temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, "min_p": c.min_p,
                "repetition_penalty": c.repetition_penalty} for name, c in PRESETS.items()}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError):
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        return _error(400, f"{param or 'body'}: {first.get('msg')}" + (
            f" (got {first['input']!r})" if param and "input" in first else ""), param)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "context_length": context_length, **worker.status()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "llm-lab"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        if body.model != model_name:
            return _error(400, f"model must be {model_name!r} (the one model served), got {body.model!r}", "model")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return _error(400, f"prompt must be one string, got a list of {len(prompts)}", "prompt")
        text = prompts[0]
        unknown = sorted(set(text) - set(vocab.chars))
        if not text or unknown:
            return _error(400, f"prompt must be non-empty text in the model's {vocab.size}-character vocabulary"
                               + (f"; unknown characters {unknown[:10]}" if unknown else ""), "prompt")
        if len(text) > context_length:
            return _error(400, f"prompt is {len(text)} tokens, longer than the model's context_length "
                               f"({context_length})", "prompt")
        if body.max_tokens > max_tokens_limit:
            return _error(400, f"max_tokens must be in [1, {max_tokens_limit}], got {body.max_tokens}", "max_tokens")
        try:
            sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                      min_p=body.min_p, repetition_penalty=body.repetition_penalty)
        except ValueError as error:
            return _error(400, str(error), str(error).split(" ")[0])
        queue: asyncio.Queue = asyncio.Queue()
        request_id = worker.submit(vocab.encode(text).tolist(), body.max_tokens, sampling, body.seed, queue)
        completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text_piece: str, finish_reason):
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"text": text_piece, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            async def events():
                finished = False
                try:
                    while not finished:
                        event = await queue.get()
                        finished = event.finished
                        piece = chunk(vocab.decode([event.token]), "length" if finished else None)
                        yield f"data: {json.dumps(piece)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if not finished:  # the client went away: free the request's KV blocks now
                        worker.cancel(request_id)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        tokens, finished = [], False
        try:
            while not finished:
                event = await queue.get()
                tokens.append(event.token)
                finished = event.finished
        finally:
            if not finished:  # the client went away: free the request's KV blocks now
                worker.cancel(request_id)
        answer = chunk(vocab.decode(tokens), "length")
        answer["usage"] = {"prompt_tokens": len(text), "completion_tokens": len(tokens),
                           "total_tokens": len(text) + len(tokens)}
        return answer

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve the trained lab model with an OpenAI-compatible API",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="serve the quick lab model instead of the full one")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 = this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    parser.add_argument("--block-size", type=int, default=16, help="token slots per KV block")
    args = parser.parse_args(argv)

    import uvicorn
    from lab import trained_lab_model

    preset = "quick" if args.quick else "full"
    lab = trained_lab_model(preset, device="cpu")
    app = create_app(lab.model, lab.data.vocab, f"lab-{preset}", args.max_batch_size, args.block_size)
    print(f"serving lab-{preset} on http://{args.host}:{args.port}/  (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
