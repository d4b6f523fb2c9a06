"""``posttrain chat MODEL_OR_RUN [MORE ...]``: talk to trained models in the terminal, several side by side.

Each model keeps its own conversation. A turn renders the whole conversation (system prompt, then history, then
the new user message) with the model's own chat template and ``add_generation_prompt=True`` -- the same rendering
training used, since posttrain saves the template with the model -- and streams the reply as transformers'
``TextStreamer`` decodes it. Generation stops at EOS or the template's end-of-turn token, and every sampling
setting is passed explicitly so the checkpoint's ``generation_config.json`` cannot change what was asked for
(as in ``rollout.hf``).

When the conversation no longer fits the model's context (``max_position_embeddings``) with room for
``max_new_tokens``, the oldest exchanges are dropped (the system prompt is kept) and the driver says so.
"""

from __future__ import annotations

import functools
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from posttrain.data.dataset import end_of_turn_ids, use_chat_template
from posttrain.data.templates import BUILTIN_TEMPLATES, _tokenizer_template
from posttrain.models.loading import ModelLoadError, load_for_inference
from posttrain.rollout.hf import SamplingSettings, render_prompt_ids

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt, then reset), /history, /quit (or Ctrl-D)"
# Names that say where a model sits rather than which one it is: `runs/demo/sft/model` is `sft`.
PLACEHOLDER_NAMES = {"model", "final", "merged", "export", "exported", "adapter"}


class ChatError(ValueError):
    """A turn cannot be generated (e.g. the message alone exceeds the model's context); the message says why."""


def chat_name(path: str | Path) -> str:
    """A model's display name: the last meaningful component of its path (``runs/demo/sft`` and
    ``runs/demo/sft/model`` are both ``sft``)."""
    parts = Path(path).resolve().parts
    for part in reversed(parts):
        if part not in PLACEHOLDER_NAMES and part != Path(part).anchor:
            return part
    return parts[-1] if parts else str(path)


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Display names for several models: two runs both called ``sft`` become ``a/sft`` and ``b/sft`` (other names
    stay short), and the same path given twice gets ``#2``."""
    names = [chat_name(p) for p in paths]
    longer = []
    for path, name in zip(paths, names):
        if names.count(name) == 1:
            longer.append(name)
            continue
        folder = Path(path).resolve()
        while folder.name != name and folder != folder.parent:
            folder = folder.parent
        longer.append(f"{folder.parent.name}/{name}" if folder.parent.name else name)
    seen: dict[str, int] = {}
    result = []
    for name in longer:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return result


@functools.cache
def _streamer_class() -> type:
    """transformers' ``TextStreamer`` (it does the incremental decoding) sending each finalised piece of text to a
    callback instead of printing it. Whitespace at either end of the reply is held back, so the streamed text is
    exactly the stored (stripped) reply. Built on first use so importing this module does not import
    transformers."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def __init__(self, tokenizer: Any, on_token: Callable[[str], None]) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.on_token, self.started, self.held = on_token, False, ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            text = self.held + text if self.started else text.lstrip()
            shown = text.rstrip()
            self.held = text[len(shown) :]  # sent once more text follows; dropped at the end of the reply
            if shown:
                self.started = True
                self.on_token(shown)

    return CallbackStreamer


class ChatSession:
    """One model in a chat: its conversation and how it answers.

    ``history`` holds the user/assistant messages (the system prompt is kept apart in ``system`` so ``/reset``
    keeps it). ``generate_reply`` renders system + history + the new message with the tokenizer's chat template,
    generates (streaming pieces of text to ``on_token``), and appends the exchange to the history.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        stop_token_ids: Iterable[int],
        system: str | None = None,
        settings: SamplingSettings | None = None,
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.stop_token_ids = sorted({int(i) for i in stop_token_ids if i is not None})
        self.system = system or None
        self.settings = settings or SamplingSettings(max_new_tokens=256)
        self.history: list[dict[str, str]] = []
        self.dropped_exchanges = 0  # oldest exchanges forgotten to fit the context, since the last reset

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        """The conversation as the template sees it: system prompt, history, and ``user_text`` if given."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return head + self.history + tail

    def render(self, user_text: str) -> str:
        """The prompt text for the next reply to ``user_text`` (chat template, generation prompt appended)."""
        return self.tokenizer.apply_chat_template(self.messages(user_text), tokenize=False, add_generation_prompt=True)

    def reset(self) -> None:
        self.history = []
        self.dropped_exchanges = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def _context_limit(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def _prompt_ids(self, user_text: str) -> list[int]:
        # Render with the shared helper so chat prompts are tokenised exactly as rollouts and evaluation do.
        prompt_ids = render_prompt_ids(self.tokenizer, self.messages(user_text))
        limit = self._context_limit()
        while limit and len(prompt_ids) + self.settings.max_new_tokens > limit and self.history:
            self.history = self.history[2:]  # one user/assistant exchange, oldest first
            self.dropped_exchanges += 1
            prompt_ids = render_prompt_ids(self.tokenizer, self.messages(user_text))
        if limit and len(prompt_ids) >= limit:
            raise ChatError(
                f"{self.name}: the prompt is {len(prompt_ids)} tokens and the model's context is {limit}; "
                "send a shorter message or a shorter system prompt"
            )
        return prompt_ids

    @torch.no_grad()
    def generate_reply(self, user_text: str, on_token: Callable[[str], None] | None = None) -> str:
        """The model's reply to ``user_text`` given the conversation so far; pieces of text go to ``on_token`` as
        they are decoded. The exchange is appended to ``history``; the reply is returned stripped."""
        prompt_ids = self._prompt_ids(user_text)
        limit = self._context_limit()
        max_new_tokens = self.settings.max_new_tokens
        if limit:
            max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
        sampling: dict[str, Any] = (
            {
                "do_sample": True,
                "temperature": self.settings.temperature,
                "top_p": self.settings.top_p,
                "top_k": self.settings.top_k,
            }
            if self.settings.temperature > 0
            else {"do_sample": False}
        )
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt_ids], device=device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_token_ids,
            # A run saved with gradient checkpointing has use_cache=false in its config; chatting wants the cache.
            use_cache=True,
            streamer=_streamer_class()(self.tokenizer, on_token) if on_token is not None else None,
            **sampling,
        )
        reply_ids = output[0, len(prompt_ids) :].tolist()
        for position, token in enumerate(reply_ids):
            if token in self.stop_token_ids:
                reply_ids = reply_ids[: position + 1]
                break
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
        return reply


def load_session(
    path: str | Path,
    name: str | None = None,
    system: str | None = None,
    settings: SamplingSettings | None = None,
    template: str | None = None,
    dtype: str = "float32",
) -> ChatSession:
    """A ``ChatSession`` for a run directory, model directory or adapter directory (``load_for_inference``).

    ``template``: a built-in template name or ``.jinja`` file to render with instead of the tokenizer's own.

    Raises:
        FileNotFoundError / ModelLoadError: ``path`` is not a loadable model.
        ModelLoadError: the tokenizer has no chat template and none was given.
    """

    name = name or chat_name(path)
    model, tokenizer = load_for_inference(path, dtype=dtype)
    if template is None and _tokenizer_template(tokenizer) is None:
        raise ModelLoadError(
            f"{name} ({path}): its tokenizer has no chat template, so a conversation cannot be rendered. Chat with a "
            "model that has one (an SFT run of posttrain saves its template with the model; instruct/chat models "
            f"ship one), or pass --template with one of {', '.join(sorted(BUILTIN_TEMPLATES))} or a .jinja file"
        )
    template_name = use_chat_template(tokenizer, template)
    stop_ids = set(end_of_turn_ids(tokenizer, template_name))
    # Chat checkpoints often list their end-of-turn token only in generation_config (llama3's <|eot_id|>).
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop_ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return ChatSession(model, tokenizer, name, stop_ids, system=system, settings=settings)


def format_columns(replies: Sequence[tuple[str, str]], width: int, gap: int = 3) -> str | None:
    """Replies laid out as columns under their names within ``width`` characters, or None when a column would be
    narrower than 20 characters."""
    column = (width - gap * (len(replies) - 1)) // max(len(replies), 1)
    if column < 20:
        return None
    columns = []
    for name, reply in replies:
        lines = [name[:column], "-" * min(len(name), column)]
        for paragraph in reply.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, column) or [""]
        columns.append(lines)
    height = max(len(c) for c in columns)
    rows = []
    for row in range(height):
        cells = [(c[row] if row < len(c) else "").ljust(column) for c in columns]
        rows.append((" " * gap).join(cells).rstrip())
    return "\n".join(rows)


class _Chat:
    """The driver's state: the sessions and where output goes."""

    def __init__(self, sessions: list[ChatSession], out: TextIO, columns: bool) -> None:
        self.sessions, self.out, self.columns = sessions, out, columns

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def turn(self, user_text: str) -> None:
        """Every model answers ``user_text``: streamed under its name, or (``columns``) all at once side by side.
        On Ctrl-C or a ChatError the whole turn is undone, so the conversations stay aligned."""
        before = [(list(s.history), s.dropped_exchanges) for s in self.sessions]
        replies: list[tuple[str, str]] = []
        try:
            for session in self.sessions:
                dropped = session.dropped_exchanges
                if self.columns:
                    replies.append((session.name, session.generate_reply(user_text)))
                else:
                    self.say(f"[{session.name}]")
                    session.generate_reply(
                        user_text, on_token=lambda piece: print(piece, end="", file=self.out, flush=True)
                    )
                    self.say()
                if session.dropped_exchanges > dropped:
                    self.say(
                        f"({session.name}: context full, forgot the {session.dropped_exchanges - dropped} oldest exchange(s))"
                    )
        except (KeyboardInterrupt, ChatError) as stopped:
            for session, (history, dropped) in zip(self.sessions, before):
                session.history, session.dropped_exchanges = history, dropped
            if isinstance(stopped, ChatError):
                raise
            self.say("\n(interrupted; this turn is forgotten)")
            return
        if self.columns:
            width = shutil.get_terminal_size((100, 24)).columns
            laid_out = format_columns(replies, width)
            self.say(laid_out if laid_out is not None else "\n\n".join(f"[{n}]\n{r}" for n, r in replies))

    def history(self) -> None:
        for session in self.sessions:
            self.say(f"[{session.name}]")
            if not session.messages():
                self.say("(empty)")
            for message in session.messages():
                self.say(f"{message['role']}: {message['content']}")

    def command(self, line: str) -> bool:
        """Run a ``/command``; False means leave."""
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            for session in self.sessions:
                session.reset()
            self.say("(conversation cleared)")
        elif command == "/system":
            if argument.strip():
                for session in self.sessions:
                    session.set_system(argument.strip())
                self.say("(system prompt set; conversation cleared)")
            else:
                self.say(f"system prompt: {self.sessions[0].system or '(none)'}")
        elif command == "/history":
            self.history()
        else:
            self.say(f"unknown command {command}; {HELP}")
        return True


def run_chat(
    paths: Sequence[str | Path],
    prompts: Sequence[str] | None = None,
    system: str | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    template: str | None = None,
    dtype: str = "float32",
    columns: bool = False,
    input_fn: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """Chat with the models at ``paths``. With ``prompts``, each is one turn (history kept between them) and the
    function returns; otherwise lines are read with ``input_fn`` until ``/quit``, ``/exit`` or EOF. Returns the
    exit code (1 when a scripted turn could not be generated)."""
    out = out if out is not None else sys.stdout
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    names = unique_names(paths)
    sessions = [load_session(p, n, system, settings, template, dtype) for p, n in zip(paths, names)]
    chat = _Chat(sessions, out, columns)
    if prompts:
        for prompt in prompts:
            if len(prompts) > 1:
                chat.say(f"you> {prompt}")
            try:
                chat.turn(prompt)
            except ChatError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        return 0

    if input_fn is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    chat.say(f"chatting with {', '.join(names)}; {HELP}")
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            chat.say()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.turn(line)
        except ChatError as error:
            chat.say(f"error: {error}")
