"""`posttrain serve` as a user meets it: a live server on a loopback port (a subprocess, started and stopped by the
module's fixture) driven by the official ``openai`` client. Answers are checked against what posttrain's own
decoding loop generates on a peft model loaded with the same adapter; errors against the OpenAI error shape and the
statuses of the contract (issue 18); run-time adapter loading against the path rules; ``/metrics`` against the
requests made; and a hypothesis fuzz of the request schema against "no request can crash the server"."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from helpers import REPO, make_lora, save_micro_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BASE_ID = "tiny-run"  # the base is given as a run directory: its model id is the run directory's name
API_KEY = "test-key"
PINNED = ("sql", "poet", "math")
MAX_BODY_BYTES = 65536
MAX_BATCH_SIZE = 8  # rows decoded together; small, so a test can fill the batch and the queue
MAX_WAITING = 8  # at least the widest parallel test (6 clients), which must never see a full queue
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def served(toy: Any, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A micro base model saved as a run directory, with weights at 15x the usual init scale (at the usual scale
    every answer repeats one token, so a request answered by the wrong adapter could pass), three pinned adapters
    (plain directories and one LoRA run directory, outside the adapter directory: the operator's command line is
    trusted), and an adapter directory holding adapters to load at run time, an adapter of another base, and a
    symlink pointing out of it."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from posttrain.data.dataset import end_of_turn_ids, use_chat_template

    root = tmp_path_factory.mktemp("serve-http")
    base_dir = save_micro_model(toy.model, root / BASE_ID / "model", initializer_range=0.3)
    pinned = {
        "sql": make_lora(base_dir, root / "adapters" / "sql", seed=1),
        "poet": make_lora(base_dir, root / "runs" / "poet" / "model", seed=2, rank=8, targets=("o_proj", "up_proj")),
        "math": make_lora(base_dir, root / "adapters" / "math", seed=3, rank=2, targets=("k_proj", "down_proj")),
    }
    pinned_paths = {"sql": pinned["sql"], "poet": root / "runs" / "poet", "math": pinned["math"]}
    library = root / "library"
    make_lora(base_dir, library / "ondemand", seed=4)
    make_lora(base_dir, library / "extra", seed=5, targets=("q_proj", "gate_proj"))
    outside = make_lora(base_dir, root / "outside", seed=6)
    (library / "escape").symlink_to(outside)
    config = AutoConfig.from_pretrained(base_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    other_base = root / "other-base"
    LlamaForCausalLM(config).save_pretrained(other_base)
    make_lora(other_base, library / "foreign", seed=7)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    stop_ids = end_of_turn_ids(tokenizer, use_chat_template(tokenizer, None))
    adapter_paths: dict[str | None, Path] = {
        **pinned,
        "ondemand": library / "ondemand",
        "extra": library / "extra",
        "runtime-extra": library / "extra",
    }
    return SimpleNamespace(
        root=root,
        run_dir=root / BASE_ID,
        base_dir=base_dir,
        pinned_paths=pinned_paths,
        library=library,
        outside=outside,
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        adapter_paths=adapter_paths,
        models={},
    )


@pytest.fixture(scope="module")
def server(served: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """``python -m posttrain serve`` on a free loopback port, ready when ``/health`` answers 200; stopped with
    SIGTERM at the end (unless a test already did), which must exit 0."""
    from posttrain.runtime.distributed import free_loopback_port

    port = free_loopback_port()
    command = [sys.executable, "-m", "posttrain", "serve", str(served.run_dir)]
    for name, path in served.pinned_paths.items():
        command += ["--adapter", f"{name}={path}"]
    command += ["--adapter-dir", str(served.library), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY_BYTES)]
    command += ["--max-batch-size", str(MAX_BATCH_SIZE), "--max-waiting", str(MAX_WAITING)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    stderr_path = served.root / "server.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=served.root)
    url = f"http://127.0.0.1:{port}"

    def log() -> str:
        return stderr_path.read_text(errors="replace")

    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} before it was ready:\n{log()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not answer /health within 180 s:\n{log()}")
        time.sleep(0.2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    try:
        yield SimpleNamespace(url=url, port=port, process=process, client=client, log=log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                pytest.fail(f"the server did not exit within 60 s of SIGTERM:\n{log()}")
        assert process.returncode == 0, f"the server exited with {process.returncode}:\n{log()}"


# -- what posttrain itself generates ------------------------------------------------------------------------------
def reference_model(served: SimpleNamespace, adapter: str | None) -> Any:
    """The base, or a peft model of the base with ``adapter`` loaded from its directory (cached)."""
    if adapter not in served.models:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(served.base_dir)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, served.adapter_paths[adapter])
        served.models[adapter] = model.eval()
    return served.models[adapter]


def reference_answer(served: SimpleNamespace, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> Any:
    """posttrain's greedy answer (``rollout.hf.generate_from_ids``): ``text`` (stop token excluded, as the API
    shows it), ``token_ids`` (stop token included: it counts as a completion token), ``finish_reason``."""
    from posttrain.rollout.hf import SamplingSettings, generate_from_ids

    tokenizer = served.tokenizer
    [[response]] = generate_from_ids(
        reference_model(served, adapter),
        [prompt_ids],
        SamplingSettings(num_samples=1, max_new_tokens=max_tokens, temperature=0.0),
        tokenizer.pad_token_id,
        served.stop_ids,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )
    return SimpleNamespace(
        text=response.text,
        token_ids=response.token_ids,
        finish_reason="stop" if response.finished else "length",
    )


def chat_prompt_ids(served: SimpleNamespace, messages: list[dict[str, Any]]) -> list[int]:
    from posttrain.rollout.hf import render_prompt_ids

    return render_prompt_ids(served.tokenizer, messages)


def question(text: str) -> list[dict[str, Any]]:
    return [SYSTEM, {"role": "user", "content": text}]


def greedy_chat(server: SimpleNamespace, model: str, messages: list[dict[str, Any]], **settings: Any) -> Any:
    return server.client.chat.completions.create(model=model, messages=messages, temperature=0, **settings)


def assert_error_object(response: httpx.Response) -> dict[str, Any]:
    """The body is an OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert set(body["error"]) >= ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


def listed_models(server: SimpleNamespace) -> dict[str, dict[str, Any]]:
    return {model.id: model.model_dump() for model in server.client.models.list()}


def metric_totals(server: SimpleNamespace) -> defaultdict[str, float]:
    """Each sample name of ``/metrics`` summed over its labels (Prometheus text parsed by prometheus_client); 0 for
    a labelled counter that has no sample yet."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    totals: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return totals


def admin(server: SimpleNamespace, route: str, body: dict[str, Any], client: openai.OpenAI | None = None) -> Any:
    return (client or server.client).post(f"/{route}", body=body, cast_to=object)


# -- models -------------------------------------------------------------------------------------------------------
def test_ready_line_and_models_list_the_base_and_the_pinned_adapters(
    server: SimpleNamespace, served: SimpleNamespace
) -> None:
    assert re.search(rf"serving {BASE_ID} on http://127\.0\.0\.1:{server.port}/v1 \(3 adapters\)", server.log()), (
        server.log()
    )
    models = listed_models(server)
    assert set(models) >= {BASE_ID, *PINNED}
    assert not set(models) & {"ondemand", "extra", "foreign"}  # on-demand adapters are not resident yet
    for model_id, model in models.items():
        assert model["object"] == "model" and model["owned_by"] == "posttrain", model
        assert model["parent"] == (None if model_id == BASE_ID else BASE_ID), model
    assert Path(models[BASE_ID]["root"]).resolve() in (served.run_dir.resolve(), served.base_dir.resolve())
    assert Path(models["sql"]["root"]).resolve() == served.pinned_paths["sql"].resolve()


# -- chat completions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["sql", "poet"])
def test_greedy_chat_equals_posttrain_generation_with_the_adapter_and_differs_from_the_base(
    server: SimpleNamespace, served: SimpleNamespace, adapter: str
) -> None:
    messages = question("What is 12 plus 30?")
    prompt_ids = chat_prompt_ids(served, messages)
    expected = reference_answer(served, adapter, prompt_ids, max_tokens=16)
    answer = greedy_chat(server, adapter, messages, max_tokens=16)
    assert answer.model == adapter and answer.object == "chat.completion"
    assert len(answer.choices) == 1 and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.total_tokens == len(prompt_ids) + len(expected.token_ids)

    base_answer = greedy_chat(server, BASE_ID, messages, max_tokens=16)
    assert base_answer.choices[0].message.content == reference_answer(served, None, prompt_ids, 16).text
    assert base_answer.choices[0].message.content != expected.text


def test_streamed_deltas_join_to_the_answer_with_usage_last(server: SimpleNamespace) -> None:
    messages = question("Name a colour.")
    whole = greedy_chat(server, "math", messages, max_tokens=12)
    stream = greedy_chat(server, "math", messages, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in with_choices) == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in with_choices][-1] == whole.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_stream_is_server_sent_events_ending_in_done(server: SimpleNamespace) -> None:
    body = {"model": "sql", "messages": question("Hello"), "max_tokens": 5, "stream": True}
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line.strip()]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)
    for event in events[:-1]:
        assert json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_same_seed_same_sample_alone_and_among_parallel_requests(server: SimpleNamespace) -> None:
    messages = question("Tell me a story.")

    def sample(model: str, seed: int) -> str:
        answer = server.client.chat.completions.create(
            model=model, messages=messages, temperature=1.0, seed=seed, max_tokens=24
        )
        return answer.choices[0].message.content

    first = sample("poet", 1234)
    assert sample("poet", 1234) == first
    assert sample("poet", 99) != first  # the seed matters, so the equalities above say something
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(sample, model, seed) for model, seed in [("poet", 1234), (BASE_ID, 1), ("sql", 2)]]
        jobs += [pool.submit(sample, model, seed) for model, seed in [("math", 3), ("poet", 1234), ("poet", 4)]]
        together = [job.result() for job in jobs]
    assert together[0] == together[4] == first


def test_n_choices_are_distinct_samples(server: SimpleNamespace) -> None:
    answer = server.client.chat.completions.create(
        model="sql", messages=question("Pick a number."), temperature=1.0, seed=5, n=3, max_tokens=16
    )
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in answer.choices}) > 1


def test_stop_strings_cut_the_text_and_finish_with_stop(server: SimpleNamespace) -> None:
    messages = question("Describe the sea.")
    full = greedy_chat(server, "sql", messages, max_tokens=16).choices[0]
    assert len(full.message.content) >= 6, full
    stop = full.message.content[3:5]
    cut = full.message.content[: full.message.content.index(stop)]
    for stop_field in (stop, ["never \x01 appears", stop]):
        choice = greedy_chat(server, "sql", messages, max_tokens=16, stop=stop_field).choices[0]
        assert choice.message.content == cut and choice.finish_reason == "stop", stop_field


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_ends_with_length(server: SimpleNamespace, served: SimpleNamespace, field: str) -> None:
    messages = question("Count to ten.")
    expected = reference_answer(served, "math", chat_prompt_ids(served, messages), max_tokens=16)
    assert len(expected.token_ids) > 2  # the answer does not stop by itself within two tokens
    answer = greedy_chat(server, "math", messages, **{field: 2})
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2
    assert answer.choices[0].message.content == served.tokenizer.decode(
        expected.token_ids[:2], skip_special_tokens=True
    )


def test_logprobs_are_the_models_log_softmax_with_three_alternatives(
    server: SimpleNamespace, served: SimpleNamespace
) -> None:
    """Greedy, so each chosen token is the top alternative; the values equal ``log_softmax`` of a plain forward of
    the peft model over prompt + answer."""
    import torch

    messages = question("Spell cat.")
    prompt_ids = chat_prompt_ids(served, messages)
    answer = greedy_chat(server, "sql", messages, max_tokens=6, logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    generated = reference_answer(served, "sql", prompt_ids, max_tokens=6).token_ids
    with torch.no_grad():
        logits = reference_model(served, "sql")(input_ids=torch.tensor([prompt_ids + generated])).logits[0]
    expected = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    for entry, token_id, row in zip(entries, generated, expected):
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


# -- completions --------------------------------------------------------------------------------------------------
def test_completion_of_a_prompt_string(server: SimpleNamespace, served: SimpleNamespace) -> None:
    """The prompt is tokenised as the tokenizer does by default (special tokens added where it adds them, as
    vLLM does), and answered like posttrain's generation from those ids."""
    prompt = "The capital of France is"
    prompt_ids = served.tokenizer(prompt)["input_ids"]
    expected = reference_answer(served, "poet", prompt_ids, max_tokens=10)
    answer = server.client.completions.create(model="poet", prompt=prompt, max_tokens=10, temperature=0)
    assert answer.object == "text_completion" and answer.model == "poet"
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids)


# -- errors -------------------------------------------------------------------------------------------------------
def test_unknown_model_is_404_never_the_bases_answer(server: SimpleNamespace) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        greedy_chat(server, "no-such-adapter", question("Hi"), max_tokens=4)
    assert raised.value.code == "model_not_found" and "no-such-adapter" in raised.value.message
    with pytest.raises(openai.NotFoundError) as raised:
        server.client.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=4)
    assert raised.value.code == "model_not_found"


def test_wrong_or_missing_api_key_is_401(server: SimpleNamespace) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.chat.completions.create(model="sql", messages=question("Hi"), max_tokens=4)
    assert raised.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "sql", "messages": []}, timeout=30)
    assert response.status_code == 401 and assert_error_object(response)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "limits, field",
    [
        ({"max_tokens": 600}, "context"),  # the micro model's context is 512 tokens
        ({"max_tokens": 4, "n": 17}, r"\bn\b"),
        ({"max_tokens": 4, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_requests_over_the_limits_are_400(server: SimpleNamespace, limits: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        greedy_chat(server, "sql", question("Hi"), **limits)


def test_unknown_field_is_400_naming_it(server: SimpleNamespace) -> None:
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        greedy_chat(server, "sql", question("Hi"), max_tokens=4, extra_body={"frobnicate": 1})


def test_malformed_json_is_400_and_an_oversized_body_413(server: SimpleNamespace) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "sql", ', headers=headers)
    assert malformed.status_code == 400
    assert_error_object(malformed)
    body = {"model": "sql", "messages": question("x" * MAX_BODY_BYTES), "max_tokens": 1}
    oversized = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert oversized.status_code == 413
    assert_error_object(oversized)


# -- run-time adapters --------------------------------------------------------------------------------------------
def test_load_answer_unload_an_adapter_from_the_adapter_dir(server: SimpleNamespace, served: SimpleNamespace) -> None:
    path = str(served.library / "extra")
    assert admin(server, "load_lora_adapter", {"lora_name": "runtime-extra", "lora_path": path}) == {
        "status": "loaded",
        "lora_name": "runtime-extra",
    }
    assert listed_models(server)["runtime-extra"]["parent"] == BASE_ID
    messages = question("What is 2 plus 2?")
    expected = reference_answer(served, "runtime-extra", chat_prompt_ids(served, messages), max_tokens=10)
    assert greedy_chat(server, "runtime-extra", messages, max_tokens=10).choices[0].message.content == expected.text

    admin(server, "unload_lora_adapter", {"lora_name": "runtime-extra"})
    assert "runtime-extra" not in listed_models(server)
    with pytest.raises(openai.NotFoundError) as raised:
        greedy_chat(server, "runtime-extra", messages, max_tokens=4)
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        admin(server, "unload_lora_adapter", {"lora_name": "runtime-extra"})


def test_adapter_paths_outside_the_adapter_dir_are_403(server: SimpleNamespace, served: SimpleNamespace) -> None:
    for path in ["../outside", str(served.outside), "escape", str(served.library / "escape")]:
        with pytest.raises(openai.PermissionDeniedError):
            admin(server, "load_lora_adapter", {"lora_name": "sneaky", "lora_path": path})
    assert "sneaky" not in listed_models(server)


def test_missing_or_foreign_adapters_are_refused_with_the_reason(
    server: SimpleNamespace, served: SimpleNamespace
) -> None:
    with pytest.raises((openai.BadRequestError, openai.NotFoundError), match="does not exist"):
        admin(server, "load_lora_adapter", {"lora_name": "ghost", "lora_path": str(served.library / "ghost")})
    with pytest.raises(openai.BadRequestError, match="hidden_size"):
        admin(server, "load_lora_adapter", {"lora_name": "foreign", "lora_path": str(served.library / "foreign")})
    assert not {"ghost", "foreign"} & set(listed_models(server))


def test_admin_needs_the_api_key(server: SimpleNamespace, served: SimpleNamespace) -> None:
    body = {"lora_name": "extra", "lora_path": str(served.library / "extra")}
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=30)
    assert response.status_code == 401
    assert_error_object(response)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        admin(server, "load_lora_adapter", body, client=wrong)
    assert "extra" not in listed_models(server)


def test_an_adapter_dir_sub_directory_loads_on_demand(server: SimpleNamespace, served: SimpleNamespace) -> None:
    before = metric_totals(server)
    messages = question("Where is the station?")
    expected = reference_answer(served, "ondemand", chat_prompt_ids(served, messages), max_tokens=10)
    assert greedy_chat(server, "ondemand", messages, max_tokens=10).choices[0].message.content == expected.text
    assert listed_models(server)["ondemand"]["parent"] == BASE_ID
    after = metric_totals(server)
    assert after["posttrain_adapter_misses_total"] == before["posttrain_adapter_misses_total"] + 1
    greedy_chat(server, "ondemand", messages, max_tokens=1)
    assert metric_totals(server)["posttrain_adapter_hits_total"] == after["posttrain_adapter_hits_total"] + 1


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_latency(server: SimpleNamespace) -> None:
    before = metric_totals(server)
    answer = greedy_chat(server, "sql", question("Metrics?"), max_tokens=3)
    after = metric_totals(server)
    generated = answer.usage.completion_tokens

    def moved(name: str) -> float:
        return after[name] - before[name]

    assert moved("posttrain_requests_total") == 1
    assert moved("posttrain_generated_tokens_total") == generated
    assert moved("posttrain_adapter_hits_total") == 1 and moved("posttrain_adapter_misses_total") == 0
    assert moved("posttrain_time_to_first_token_seconds_count") == 1
    assert moved("posttrain_request_latency_seconds_count") == 1
    assert 0 < moved("posttrain_request_latency_seconds_sum") < 60
    assert after["posttrain_queue_length"] == 0
    assert after["posttrain_adapters_resident"] == len(listed_models(server)) - 1


# -- fuzz ---------------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
messages_values = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]) | json_values},
        optional={"content": st.text(max_size=40) | json_values, "name": json_values},
    ),
    max_size=4,
)
request_fields = {
    "model": st.sampled_from([BASE_ID, "sql", "ondemand", "nope", "", "../sql"]) | json_values,
    "messages": messages_values | json_values,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 70000), max_size=6) | json_values,
    "max_tokens": st.integers(-3, 12) | json_values,
    "max_completion_tokens": st.integers(-3, 12) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "n": st.integers(-1, 20) | json_values,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5) | json_values,
    "seed": st.integers(-(2**64), 2**64) | json_values,
    "logprobs": st.booleans() | st.integers(-2, 25) | json_values,
    "top_logprobs": st.integers(-2, 25) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
}
request_bodies = (
    st.fixed_dictionaries({}, optional=request_fields).map(lambda body: json.dumps(body).encode())
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=64)
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=request_bodies)
def test_fuzzed_requests_never_crash_the_server(server: SimpleNamespace, route: str, body: bytes) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}{route}", content=body, headers=headers, timeout=120)
    assert response.status_code < 500 or response.status_code == 503, (body, response.status_code, response.text)
    if response.status_code >= 400:
        assert_error_object(response)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip("\n").endswith("data: [DONE]"), response.text
    else:
        assert isinstance(response.json()["choices"], list), response.text


def test_the_server_is_healthy_and_correct_after_the_fuzz(server: SimpleNamespace, served: SimpleNamespace) -> None:
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    messages = question("Still there?")
    expected = reference_answer(served, "math", chat_prompt_ids(served, messages), max_tokens=8)
    assert greedy_chat(server, "math", messages, max_tokens=8).choices[0].message.content == expected.text


# -- disconnects and shutdown -------------------------------------------------------------------------------------
LONG_QUESTION = question("A long answer, please.")


def long_greedy_answer(served: SimpleNamespace, adapter: str, max_tokens: int) -> Any:
    """posttrain's greedy answer to ``LONG_QUESTION``, checked to run to ``max_tokens`` (no early stop token), so a
    request for it is still generating a while after its first chunk."""
    expected = reference_answer(served, adapter, chat_prompt_ids(served, LONG_QUESTION), max_tokens)
    assert expected.finish_reason == "length", f"{adapter}'s greedy answer stops early: pick another question"
    return expected


def test_a_client_leaving_mid_stream_frees_its_row(server: SimpleNamespace, served: SimpleNamespace) -> None:
    """A 450-token answer abandoned after its first chunks: generation stops long before 450 tokens, and the
    server answers the next request."""
    long_greedy_answer(served, "poet", max_tokens=450)
    before = metric_totals(server)["posttrain_generated_tokens_total"]
    stream = greedy_chat(server, "poet", LONG_QUESTION, max_tokens=450, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    settled, previous = None, -1.0
    deadline = time.monotonic() + 60
    while settled is None and time.monotonic() < deadline:
        time.sleep(0.5)
        current = metric_totals(server)["posttrain_generated_tokens_total"]
        settled, previous = (current if current == previous else None), current
    assert settled is not None and settled - before < 450 / 2, (before, settled)
    assert metric_totals(server)["posttrain_queue_length"] == 0
    assert greedy_chat(server, "sql", question("Next"), max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_is_429_and_the_admitted_requests_are_answered(
    server: SimpleNamespace, served: SimpleNamespace
) -> None:
    """Many long requests at once: those the batch and the queue hold are admitted, the rest arrive while the queue
    is full and are refused with OpenAI's 429 error object; every admitted request gets its whole answer."""
    expected = long_greedy_answer(served, "poet", max_tokens=450)
    body = {"model": "poet", "messages": LONG_QUESTION, "max_tokens": 450, "temperature": 0}
    burst = 4 * (MAX_BATCH_SIZE + MAX_WAITING)

    def post(_: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(burst) as pool:
        responses = list(pool.map(post, range(burst)))
    answered = [r.json() for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    # Rows are filled only at a step boundary: a burst can fill the queue before the first step admits anyone, so
    # at least MAX_WAITING requests are admitted, not always MAX_BATCH_SIZE + MAX_WAITING (a fresh clone saw 10).
    assert len(answered) >= MAX_WAITING and refused, [r.status_code for r in responses]
    for response in refused:
        assert response.status_code == 429 and assert_error_object(response)["code"] == "queue_full", response.text
    assert {answer["choices"][0]["message"]["content"] for answer in answered} == {expected.text}
    assert {answer["usage"]["completion_tokens"] for answer in answered} == {450}
    assert metric_totals(server)["posttrain_queue_length"] == 0


def test_sigterm_finishes_the_stream_in_flight_then_exits_0(server: SimpleNamespace, served: SimpleNamespace) -> None:
    """Last: it stops the module's server. The stream that was running when SIGTERM arrived gets all its tokens
    and its usage; the process then exits 0."""
    expected = long_greedy_answer(served, "sql", max_tokens=400)
    stream = greedy_chat(
        server, "sql", LONG_QUESTION, max_tokens=400, stream=True, stream_options={"include_usage": True}
    )
    chunks = iter(stream)
    received = [next(chunks)]
    server.process.send_signal(signal.SIGTERM)
    received += list(chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in received if chunk.choices) == expected.text
    assert received[-1].usage.completion_tokens == 400, received[-1]
    assert server.process.wait(timeout=60) == 0, server.log()
