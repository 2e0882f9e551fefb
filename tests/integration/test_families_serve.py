"""Each family served end to end, from safetensors and from GGUF, with its own tokenizer and chat template: a tiny
random-weight model (tests/families.py) over a real vocabulary (llama.cpp's vocab files in tests/data/vocab: Llama 3's
for llama, Llama 2's SentencePiece one for mistral, Qwen2's for both Qwens), through the real app and front end.

The GGUF is F32, so both files hold the same weights and must give the same greedy text; a chat prompt is the template's
text tokenized as is, and a plain prompt gets the tokenizer's BOS where its vocabulary adds one. One family also runs
behind a real `pacer serve` process, as a user would start it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ThreadHost
from pacer.model.gguf_file import GGUFFile
from pacer.model.tokenizer import Tokenizer
from pacer.model.weights import model_family
from pacer.server.app import create_app
from tests.families import save_family
from tests.gguf_writer import write_gguf
from tests.live_server import run_server

DATA = Path(__file__).resolve().parents[1] / "data"
# family -> (llama.cpp vocab file, chat template, does its vocabulary add a BOS to a plain prompt)
SERVED = {
    "llama": ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct.jinja", True),
    "mistral": ("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407.jinja", True),
    "qwen2": ("qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", False),
    "qwen3": ("qwen2", "Qwen-Qwen3-0.6B.jinja", False),
}
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Où est Zürich? 数字 42"}]
PROMPT = "The capital of France is"


def family_files(family: str, directory: Path) -> dict[str, Path]:
    """The family's tiny model with its real tokenizer and template, as a safetensors directory and an F32 GGUF."""
    vocab, template, _ = SERVED[family]
    metadata = GGUFFile(DATA / "vocab" / f"ggml-vocab-{vocab}.gguf").metadata
    metadata = {key: value for key, value in metadata.items() if key.startswith("tokenizer.")}
    metadata["tokenizer.chat_template"] = (DATA / "templates" / template).read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    hf_dir = save_family(family, directory / "hf", tokenizer=tokenizer)
    return {"safetensors": hf_dir, "gguf": write_gguf(hf_dir, directory / "model.gguf", tokenizer=metadata)}


@pytest.fixture(scope="module", params=list(SERVED))
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Path]]:
    return request.param, family_files(request.param, tmp_path_factory.mktemp(request.param))


def serve(path: Path, calls: list[tuple[str, str, dict | None]]) -> tuple[Tokenizer, list[httpx.Response]]:
    """Send `calls` (method, route, body) to the real app over `path`, in process; the tokenizer it serves with too."""
    engine, tokenizer = build_engine(EngineConfig.from_kwargs(model=str(path), num_blocks=64, threads=1))
    frontend = Frontend([ThreadHost(lambda: engine)])
    frontend.start()
    app = create_app(frontend, tokenizer, path.name, str(path), model_family(path))

    async def main() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacer", timeout=120) as client:
                return [await client.request(method, route, json=body) for method, route, body in calls]

    return tokenizer, asyncio.run(main())


CALLS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True}),
    ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}),
]


def test_each_family_serves_from_both_files_alike(files: tuple[str, dict[str, Path]]) -> None:
    family, paths = files
    adds_bos = SERVED[family][2]
    texts = {}
    for kind, path in paths.items():
        tokenizer, (models, chat, completion) = serve(path, CALLS)
        # llama.cpp's converter writes a Mistral as a llama: the GGUF's family is what the file says
        assert models.json()["data"][0]["family"] == ("llama" if (family, kind) == ("mistral", "gguf") else family)
        assert chat.status_code == 200 and completion.status_code == 200, (chat.text, completion.text)
        rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        assert chat.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))
        assert completion.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT)) + adds_bos
        assert completion.json()["usage"]["completion_tokens"] == 6
        texts[kind] = (chat.json()["choices"][0]["message"]["content"], completion.json()["choices"][0]["text"])
    assert texts["gguf"] == texts["safetensors"]


def test_pacer_serve_runs_a_qwen3_gguf(tmp_path: Path) -> None:
    path = family_files("qwen3", tmp_path)["gguf"]
    with run_server(path, "--threads", "1", "--num-blocks", "64", log_dir=tmp_path) as server:
        [card] = httpx.get(server.url + "/v1/models").json()["data"]
        assert card["family"] == "qwen3"
        response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                              json={"model": card["id"], "messages": MESSAGES, "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] <= 4
