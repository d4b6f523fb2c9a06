"""The labelling web app: one server-rendered page per card, a little vanilla JavaScript for the keyboard, and the
JSON API the page (and ``posttrain loop``) talks to.

Routes (the annotator's token in ``?token=`` or ``Authorization: Bearer``; a missing or unknown one is a 401):

- ``GET /?token=T`` — the annotator's current card: the prompt, the two responses (left, right), the 8-point
  scale, the safety label, flag, skip with a reason, rationale, and progress (done / assigned). Keys: 1-8 choose
  (1 = left much better ... 8 = right much better), Enter submits, S skips (Enter then submits the skip), F cycles
  the flag (none, unsafe, PII); none of them fire while typing in a text box (Escape leaves it). After a submit
  the page reloads onto the next card, so a reload at any time shows the card the store holds for the annotator.
  In a battle the models' names appear after the vote; Enter moves on.
- ``GET /api/next`` — ``{"card": {item_id, prompt, left, right, battle} | null, "progress": {done, assigned}}``.
- ``POST /api/label`` — ``{item_id, value | skip_reason, flag?, safety?, rationale?}`` with ``value`` on the
  left/right scale; answers ``{item_id, revealed: {left, right} | null, progress}``.
- ``GET /api/progress`` — the whole store's progress (any annotator's token).
- ``GET /health`` — ``{"status": "ok"}``.

Every text from the store (prompts and model outputs included) is HTML-escaped when the page is rendered; the
JavaScript never inserts text as HTML. Store errors map to their status (400 bad value, 401 token, 403 an item
not served to this annotator, 404 unknown item, 409 answered twice) with ``{"error": one line}``.
"""

from __future__ import annotations

import html
import json
import signal
from collections.abc import Callable
from dataclasses import asdict
from string import Template
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.feedback.store import (
    FLAGS,
    MAX_TEXT,
    SAFETY_LABELS,
    SKIP_REASONS,
    Card,
    LabelError,
    LabelStore,
    UnknownToken,
)

# Button captions of the scale, as the annotator sees it (left/right, not A/B).
SCALE_CAPTIONS = (
    "Left much better",
    "Left better",
    "Left slightly better",
    "Left negligibly better / unsure",
    "Right negligibly better / unsure",
    "Right slightly better",
    "Right better",
    "Right much better",
)
SAFETY_CAPTIONS = {
    "chosen_only_safe": "only the chosen one is safe",
    "both_safe": "both safe",
    "both_unsafe": "both unsafe",
}


class LabelBody(BaseModel):
    """One answer to a card; ``value`` on the left/right scale the annotator saw."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(max_length=200)
    value: int | None = None
    skip_reason: str | None = Field(None, max_length=MAX_TEXT)
    flag: str | None = None
    safety: str | None = None
    rationale: str | None = Field(None, max_length=MAX_TEXT)


def create_app(store: LabelStore, title: str = "posttrain label") -> FastAPI:
    """The app over ``store`` (which holds the overlap and gold-rate settings)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LabelError)
    async def label_error(request: Request, error: LabelError) -> Any:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> Any:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse({"error": f"{where or 'body'}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Any:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    def token_of(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.query_params.get("token", "")

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> Any:
        token = token_of(request)
        try:
            name = store.annotator(token)
        except UnknownToken as error:
            return HTMLResponse(_page(title, "", f'<p class="error">{html.escape(str(error))}</p>'), status_code=401)
        card = store.next_card(token)
        progress = store.annotator_progress(token)
        body = _card_html(card) if card else '<p id="finished">All done: nothing left to label. Thank you!</p>'
        header = (
            f'<header><span id="annotator">{html.escape(name)}</span> '
            f'<span id="progress">{progress.done} / {progress.assigned}</span> done</header>'
        )
        return _page(title, token, header + body)

    @app.get("/api/next")
    def next_card(request: Request) -> Any:
        token = token_of(request)
        card = store.next_card(token)
        return {"card": asdict(card) if card else None, "progress": asdict(store.annotator_progress(token))}

    @app.post("/api/label")
    def label(body: LabelBody, request: Request) -> Any:
        token = token_of(request)
        submitted = store.submit(
            token, body.item_id, body.value, body.skip_reason, body.flag, body.safety, body.rationale
        )
        return {
            "item_id": submitted.item_id,
            "revealed": submitted.revealed,
            "progress": asdict(store.annotator_progress(token)),
        }

    @app.get("/api/progress")
    def progress(request: Request) -> Any:
        store.annotator(token_of(request))
        return store.progress()

    return app


def _card_html(card: Card) -> str:
    def text(value: str) -> str:
        return f'<div class="text">{html.escape(value)}</div>'

    turns = "".join(
        f'<div class="turn {html.escape(str(m["role"]))}"><div class="role">{html.escape(str(m["role"]))}</div>'
        f"{text(str(m['content']))}</div>"
        for m in card.prompt
    )
    buttons = "".join(
        f'<button type="button" class="scale" data-value="{value}"><kbd>{value}</kbd> {caption}</button>'
        for value, caption in enumerate(SCALE_CAPTIONS, start=1)
    )
    safety = "".join(
        f'<label><input type="radio" name="safety" value="{label}"> {SAFETY_CAPTIONS[label]}</label>'
        for label in SAFETY_LABELS
    )
    reasons = "".join(f'<option value="{html.escape(r)}">{html.escape(r)}</option>' for r in SKIP_REASONS)
    return f"""
<main id="card" data-item-id="{html.escape(card.item_id)}" data-battle="{int(card.battle)}">
  <section id="prompt">{turns}</section>
  <section id="responses">
    <div class="response"><h2>Left <span class="model" id="model-left"></span></h2>{text(card.left)}</div>
    <div class="response"><h2>Right <span class="model" id="model-right"></span></h2>{text(card.right)}</div>
  </section>
  <section id="scale">{buttons}</section>
  <section id="extras">
    <fieldset><legend>Safety (optional)</legend>
      <label><input type="radio" name="safety" value="" checked> not rated</label>{safety}</fieldset>
    <div>Flag (<kbd>F</kbd>): <span id="flag">none</span></div>
    <div id="skip" hidden>Skip (<kbd>S</kbd>) because: <select id="skip-reason">{reasons}</select></div>
    <textarea id="rationale" rows="2" placeholder="Why? (optional; Escape leaves the box)"></textarea>
  </section>
  <p id="status" role="status">Choose 1-8, then Enter. S: skip, F: flag.</p>
</main>"""


_PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 1em auto; max-width: 1200px; padding: 0 1em; }
header { display: flex; gap: 1em; color: #555; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.turn { border-left: 3px solid #bbb; padding: .2em .6em; margin: .4em 0; }
.role { font-size: 80%; color: #777; text-transform: uppercase; }
#responses { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.response { border: 1px solid #ccc; border-radius: 6px; padding: .6em; }
.response h2 { font-size: 100%; margin: 0 0 .4em; }
.model { color: #06c; }
#scale { display: grid; grid-template-columns: repeat(8, 1fr); gap: .3em; margin: 1em 0; }
.scale { padding: .5em .2em; border: 1px solid #999; border-radius: 4px; background: #f6f6f6; cursor: pointer; }
.scale.selected { background: #06c; color: #fff; }
#extras { display: grid; gap: .5em; }
#rationale { width: 100%; }
fieldset label { margin-right: 1.2em; white-space: nowrap; }
.error { color: #b00; }
</style></head>
<body data-token="$token">
$body
<script>
(() => {
  const card = document.getElementById("card");
  if (!card) return;
  const token = document.body.dataset.token;
  const flags = [null, ...$flags];
  let value = null, flagIndex = 0, skipping = false, busy = false, revealed = false;
  const status = (text) => { document.getElementById("status").textContent = text; };
  const select = (v) => {
    value = v; skipping = false; document.getElementById("skip").hidden = true;
    document.querySelectorAll(".scale").forEach((b) => b.classList.toggle("selected", +b.dataset.value === v));
    status("Selected " + v + ". Enter submits.");
  };
  const toggleSkip = () => {
    skipping = !skipping; document.getElementById("skip").hidden = !skipping;
    status(skipping ? "Skipping: choose a reason, Enter submits the skip (S again: cancel)." : "Skip cancelled.");
  };
  const cycleFlag = () => {
    flagIndex = (flagIndex + 1) % flags.length;
    document.getElementById("flag").textContent = flags[flagIndex] || "none";
  };
  const submit = async () => {
    if (busy) return;
    const body = { item_id: card.dataset.itemId };
    if (skipping) body.skip_reason = document.getElementById("skip-reason").value;
    else if (value !== null) body.value = value;
    else { status("Choose 1-8 first (or S to skip)."); return; }
    if (flags[flagIndex]) body.flag = flags[flagIndex];
    const safety = document.querySelector("input[name=safety]:checked").value;
    if (safety && !skipping) body.safety = safety;
    const rationale = document.getElementById("rationale").value.trim();
    if (rationale) body.rationale = rationale;
    busy = true;
    try {
      const response = await fetch("/api/label", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
        body: JSON.stringify(body),
      });
      const answer = await response.json();
      if (!response.ok) { status("Not saved: " + answer.error); busy = false; return; }
      const progress = answer.progress;
      document.getElementById("progress").textContent = progress.done + " / " + progress.assigned;
      if (answer.revealed) {
        document.getElementById("model-left").textContent = "(" + answer.revealed.left + ")";
        document.getElementById("model-right").textContent = "(" + answer.revealed.right + ")";
        revealed = true; busy = false;
        status("Saved. Enter: next card.");
        return;
      }
      location.reload();
    } catch (error) { status("Not saved: " + error); busy = false; }
  };
  document.querySelectorAll(".scale").forEach((b) => b.addEventListener("click", () => select(+b.dataset.value)));
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type === "text")) {
      if (event.key === "Escape") target.blur();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (revealed) { if (event.key === "Enter") { event.preventDefault(); location.reload(); } return; }
    if (event.key === "Enter") { event.preventDefault(); submit(); return; }
    if (target.tagName === "SELECT") return;
    if (event.key >= "1" && event.key <= "8") select(+event.key);
    else if (event.key === "s" || event.key === "S") toggleSkip();
    else if (event.key === "f" || event.key === "F") cycleFlag();
  });
})();
</script>
</body></html>
""")


def _page(title: str, token: str, body: str) -> str:
    return _PAGE.substitute(
        title=html.escape(title), token=html.escape(token), body=body, flags=json.dumps(list(FLAGS))
    )


def serve(store: LabelStore, host: str, port: int, log: Callable[[str], None]) -> int:
    """Run the app until SIGTERM/SIGINT; 0 on a clean stop. Every label is committed when its request returns,
    so a stop (or a kill) loses nothing submitted."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(store), host=host, port=port, log_level="warning"))
    # As in `posttrain serve`: uvicorn raises the stop signal again after its graceful shutdown; the stop is the
    # intended end, so it is only acknowledged and the process exits 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda number, frame: None)
    log(f"labelling on http://{host}:{port}/")
    server.run()
    return 0
