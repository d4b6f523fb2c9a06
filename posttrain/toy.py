"""The toy kit: a tiny Llama model, a locally trained BPE tokenizer and synthetic verifiable datasets, offline.

`build_toy(out_dir)` writes, in a few seconds:

    out_dir/model/            config.json, generation_config.json, model.safetensors, tokenizer files,
                              chat_template.jinja: loadable with AutoModelForCausalLM / AutoTokenizer
    out_dir/data/sft.jsonl       {"messages": [...], "task"}                      SFT demonstrations
    out_dir/data/prefs.jsonl     {"prompt", "chosen", "rejected", "task"}         reward model / DPO pairs
    out_dir/data/prompts.jsonl   {"messages", "reference", "task"}                RL prompts
    out_dir/data/eval.jsonl      {"messages", "reference", "task"}                held-out evaluation prompts
    out_dir/data/pretrain.jsonl  {"text"}                                          continued pretraining

Every stage's tests and the demo run on this, so it is deterministic (same seed, same bytes) and needs no
network. The tasks come from `posttrain.tasks`; their answers are scored by code. The kit is library code, not
part of the demo: a pipeline's ``toy:`` stage, ``posttrain toy`` and the tests build it.

Assumptions: the model is randomly initialised (a later pretraining/SFT stage teaches it); the chat format is
our own (`<|role|>\\n content <|end|>\\n`), with `<|end|>` as both end of turn and EOS so that generation stops
after one assistant turn.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.tasks import DEFAULT_TASKS, TASK_NAMES, TASKS, corrupt

if TYPE_CHECKING:  # transformers is imported lazily: importing this module must stay cheap
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# Model presets as data (mini: the demo's, sized for its ten-minute CPU budget). head_dim is 64 in all; grouped-query attention (2 query heads per KV head) so the
# KV-cache paths of later stages are exercised, as they would be on a real Llama/Qwen model.
SIZES: dict[str, dict[str, int]] = {
    "mini": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4},
}
MAX_POSITIONS = 1024

PAD, BOS, SYSTEM, USER, ASSISTANT, END = "<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Order fixes the ids: <|pad|>=0, <|bos|>=1, <|system|>=2, <|user|>=3, <|assistant|>=4, <|end|>=5.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, SYSTEM, USER, ASSISTANT, END)

# Every turn ends with <|end|> (the EOS), so a model trained on this stops after its turn. The generation
# prompt is exactly the head of the next assistant turn, which makes the prompt render a prefix of the full
# render: SFT loss masks and RL rollouts split prompt from response at that boundary. Unknown roles raise
# instead of rendering a role token the tokenizer does not have.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy chat template: role ' ~ m['role'] ~ ' is not one of system, user, assistant') }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a careful assistant. Answer briefly.",
    "Answer with the result only.",
    "You are a precise and concise assistant.",
)

DEFAULT_COUNTS: dict[str, int] = {"sft": 3000, "prefs": 2000, "prompts": 1000, "eval": 200, "pretrain": 2000}
SYSTEM_SHARE = 0.15  # share of SFT rows that start with a system message
TWO_TURN_SHARE = 0.10  # share of SFT rows that are two user/assistant exchanges


@dataclass(frozen=True)
class ToyPaths:
    """Where `build_toy` wrote everything."""

    root: Path
    model: Path
    sft: Path
    prefs: Path
    prompts: Path
    eval: Path
    pretrain: Path
    eval_prefs: Path
    eval_mc: Path


def model_config_kwargs(size: str) -> dict[str, int]:
    """Architecture fields for a size preset; raises ValueError naming the valid sizes."""
    if size not in SIZES:
        raise ValueError(f"unknown toy model size {size!r}; expected one of {', '.join(SIZES)}")
    preset = dict(SIZES[size])
    # SwiGLU MLP width ≈ 8/3 × hidden as in Llama, rounded to a multiple of 64 for matmul-friendly shapes.
    preset["intermediate_size"] = round(2.7 * preset["hidden_size"] / 64) * 64
    return preset


# ---- datasets --------------------------------------------------------------------------------------------------


class _PromptSampler:
    """Draws task instances round-robin over the tasks (balanced classes) and refuses held-out prompts."""

    def __init__(self, rng: random.Random, held_out: set[str], tasks: tuple[str, ...] = DEFAULT_TASKS) -> None:
        self.rng = rng
        self.held_out = held_out
        self.tasks = tasks
        self.calls = 0

    def next_task(self) -> str:
        name = self.tasks[self.calls % len(self.tasks)]
        self.calls += 1
        return name

    def draw(self, task_name: str) -> tuple[str, str]:
        """(prompt, reference) for `task_name`, redrawn until the prompt is not held out."""
        while True:
            prompt, reference = TASKS[task_name].generate(self.rng)
            if prompt not in self.held_out:
                return prompt, reference


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _eval_rows(rng: random.Random, n: int, tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """`n` distinct prompts, balanced over tasks; drawn first so training rows can avoid them."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    i = 0
    while len(rows) < n:
        name = tasks[i % len(tasks)]
        prompt, reference = TASKS[name].generate(rng)
        if prompt in seen:
            continue  # redraw the same task, keeping the balance
        seen.add(prompt)
        rows.append({"messages": [_user(prompt)], "reference": reference, "task": name})
        i += 1
    return rows


def _sft_rows(sampler: _PromptSampler, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if sampler.rng.random() < SYSTEM_SHARE:
            messages.append({"role": "system", "content": sampler.rng.choice(SYSTEM_PROMPTS)})
        if sampler.rng.random() < TWO_TURN_SHARE:
            # The first exchange is context; the row's task is the last turn's, which is what gets scored.
            first = sampler.rng.choice(sampler.tasks)
            prompt, reference = sampler.draw(first)
            messages += [_user(prompt), _assistant(reference)]
        name = sampler.next_task()
        prompt, reference = sampler.draw(name)
        messages += [_user(prompt), _assistant(reference)]
        rows.append({"messages": messages, "task": name})
    return rows


def _pref_rows(sampler: _PromptSampler, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        name = sampler.next_task()
        prompt, reference = sampler.draw(name)
        rows.append(
            {
                "prompt": [_user(prompt)],
                "chosen": [_assistant(reference)],
                "rejected": [_assistant(corrupt(name, reference, sampler.rng))],
                "task": name,
            }
        )
    return rows


def _multiple_choice_row(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """An evaluation prompt as an MMLU-style question: the reference among up to three plausible wrong answers."""
    choices = [row["reference"]]
    for _ in range(20):
        wrong = corrupt(row["task"], row["reference"], rng)
        if wrong not in choices:
            choices.append(wrong)
        if len(choices) == 4:
            break
    rng.shuffle(choices)
    return {
        "question": row["messages"][-1]["content"],
        "choices": choices,
        "answer": "ABCD"[choices.index(row["reference"])],
        "task": row["task"],
    }


def _prompt_rows(sampler: _PromptSampler, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        name = sampler.next_task()
        prompt, reference = sampler.draw(name)
        rows.append({"messages": [_user(prompt)], "reference": reference, "task": name})
    return rows


def _pretrain_rows(sampler: _PromptSampler, n: int) -> list[dict[str, Any]]:
    """Plain text: half written as sentences, half as "prompt answer" lines, so continued pretraining sees the
    tasks' vocabulary and arithmetic without the chat format. Held-out prompts are kept out of it too."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        task = TASKS[sampler.next_task()]
        while True:
            if i % 2 == 0:
                prompt, text = task.generate_text(sampler.rng)
            else:
                prompt, reference = task.generate(sampler.rng)
                text = f"{prompt} Answer: {reference}"
            if prompt not in sampler.held_out:
                break
        rows.append({"text": text})
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    # ensure_ascii=False keeps the files readable UTF-8; "\n" newline so the bytes are the same on every OS.
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_datasets(
    rng: random.Random,
    data_dir: str | Path,
    *,
    sft: int = DEFAULT_COUNTS["sft"],
    prefs: int = DEFAULT_COUNTS["prefs"],
    prompts: int = DEFAULT_COUNTS["prompts"],
    eval: int = DEFAULT_COUNTS["eval"],  # noqa: A002 - named after the file it sizes
    pretrain: int = DEFAULT_COUNTS["pretrain"],
    tasks: tuple[str, ...] = DEFAULT_TASKS,
) -> dict[str, Path]:
    """Write sft/prefs/prompts/eval/pretrain JSONL files with the given row counts into `data_dir`, drawing
    round-robin from `tasks`, plus, from the evaluation prompts: eval_prefs.jsonl, one (reference, corrupted) pair
    per prompt for a reward model's held-out accuracy, and eval_mc.jsonl, the prompt as a four-way multiple-choice
    question (`posttrain eval --data`).

    Evaluation prompts are drawn first and no training file (sft, prefs, prompts, pretrain) contains any of
    them as a user prompt, so evaluation measures generalisation. Returns {name: path}.
    """
    unknown = [name for name in tasks if name not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or '(none given)'}; expected some of {', '.join(TASK_NAMES)}")
    counts = {"sft": sft, "prefs": prefs, "prompts": prompts, "eval": eval, "pretrain": pretrain}
    for name, count in counts.items():
        if count < 0:
            raise ValueError(f"row count {name}={count} must be >= 0")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    eval_rows = _eval_rows(rng, eval, tasks)
    held_out = {row["messages"][0]["content"] for row in eval_rows}
    sampler = _PromptSampler(rng, held_out, tasks)
    all_rows = {
        "sft": _sft_rows(sampler, sft),
        "prefs": _pref_rows(sampler, prefs),
        "prompts": _prompt_rows(sampler, prompts),
        "eval": eval_rows,
        "pretrain": _pretrain_rows(sampler, pretrain),
    }
    # Drawn last, so every other file is the same with or without it.
    all_rows["eval_prefs"] = [
        {
            "prompt": row["messages"],
            "chosen": [_assistant(row["reference"])],
            "rejected": [_assistant(corrupt(row["task"], row["reference"], rng))],
            "task": row["task"],
        }
        for row in eval_rows
    ]
    all_rows["eval_mc"] = [_multiple_choice_row(row, rng) for row in eval_rows]
    paths: dict[str, Path] = {}
    for name, rows in all_rows.items():
        paths[name] = data_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)
    return paths


def corpus_texts(paths: dict[str, Path]) -> list[str]:
    """Every message content and pretraining text in the dataset files: the tokenizer's training corpus."""
    texts: list[str] = list(SYSTEM_PROMPTS)
    for path in paths.values():
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if "text" in row:
                    texts.append(row["text"])
                for key in ("messages", "prompt", "chosen", "rejected"):
                    texts.extend(m["content"] for m in row.get(key, []))
                if "reference" in row:
                    texts.append(row["reference"])
    return texts


# ---- tokenizer and model ---------------------------------------------------------------------------------------


def build_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a Hugging Face fast tokenizer with our chat template.

    Byte-level pre-tokenizer and decoder: any unicode text round-trips, so no unk token is needed. Digits are
    split one per token first, so numbers share one digit vocabulary and column arithmetic is learnable (a BPE
    that merged "58" into one token would make each sum a lookup). Spaces are split off as their own token too,
    so a word is the same token wherever it stands: with GPT-2 style "Ġword" tokens the first answer word (after
    a newline) differs from the same word in the prompt (after a space), and copy/reverse/upper need a lookup
    table besides attention. In a measured run (tiny, batch 32, lr 1e-3, 800 SFT steps) the isolated spaces
    took reverse from 0.47 to 0.97 and copy from 0.00 to 0.76 exact match. No post-processor: the chat template
    writes `<|bos|>` itself, and tokenizer(text) must not add a second one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(" ", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so unseen text still encodes
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # the cleanup would rewrite " ." and break exact round-trips
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, size: str, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama model for `tokenizer`, the same weights for the same seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    arch = model_config_kwargs(size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # at this size the output matrix would be a large share of all weights
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|end|>: stop after one assistant turn
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,  # toy answers are a few tokens; HF's default max_length=20 counts the prompt too
    )
    return model


def build_toy(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, tasks: tuple[str, ...] = DEFAULT_TASKS, **counts: int
) -> ToyPaths:
    """Build the toy kit into `out_dir`: data/*.jsonl, then a tokenizer trained on that data, then the model.

    `counts` overrides row counts by file name (sft, prefs, prompts, eval, pretrain; defaults in
    DEFAULT_COUNTS). The same seed gives byte-identical data files and identical weights. Raises ValueError for
    an unknown size or count name.
    """
    model_config_kwargs(size)  # fail on a bad size before writing anything
    unknown = set(counts) - set(DEFAULT_COUNTS)
    if unknown:
        raise ValueError(f"unknown row count(s) {sorted(unknown)}; expected some of {', '.join(DEFAULT_COUNTS)}")
    root = Path(out_dir)
    data_paths = build_datasets(random.Random(seed), root / "data", tasks=tuple(tasks), **counts)

    # The held-out pairs and questions stay out of the tokenizer's corpus, so adding them changed no tokenizer or model.
    tokenizer = build_tokenizer(
        corpus_texts({k: v for k, v in data_paths.items() if k not in ("eval_prefs", "eval_mc")})
    )
    model = build_model(tokenizer, size, seed)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return ToyPaths(root=root, model=model_dir, **data_paths)
