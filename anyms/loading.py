"""The model a command runs with: where it comes from (--model, --ip-adapter, --image-encoder,
--arch), on which device and dtype, and how it is loaded, once per command (:class:`Run`)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from . import console
from .errors import LoadError, UsageError

__all__ = ["Run", "run_from_args", "load_for_run", "default_size", "threads_for", "ARCHS", "DTYPES", "TINY_MODEL",
           "TOY_MODEL"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_IP_ADAPTER = "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
DEFAULT_SD15_IP_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
DEFAULT_FLUX_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_FLUX_IP_ADAPTER = "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors"
DEFAULT_FLUX_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
ARCHS = ("sdxl", "sd15", "flux")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# --model TINY_MODEL: the built-in tiny model of anyms.tiny (random weights, offline)
TINY_MODEL = "tiny"
# --model TOY_MODEL: the trained toy world shipped in anyms/toy/weights (offline)
TOY_MODEL = "toy"


def _split_hub_spec(spec: str, what: str, need_file: bool):
    """``owner/repo[/subfolder...][/file]`` -> ``(repo, subfolder, file)``."""
    parts = [p for p in spec.replace("\\", "/").split("/") if p]
    if len(parts) < (3 if need_file else 2):
        form = "owner/repo/[subfolder/]weight_file" if need_file else "owner/repo[/subfolder]"
        raise UsageError(f"{what}: {spec!r} is neither a local path nor a Hub spec {form}")
    if need_file:
        return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    return "/".join(parts[:2]), "/".join(parts[2:]), None


@dataclass
class Run:
    """What every image of one command shares: the model and where it runs."""

    sources: dict
    device: Any
    dtype: Any
    offload: str = "none"
    vae_tiling: bool = False
    overwrite: bool = False
    pictures: bool = True
    max_memory: Optional[str] = None      # --max-memory as given (its plan is in dtype, offload, vae_tiling)

    @property
    def arch(self) -> str:
        return self.sources["arch"]

    @property
    def default_guidance(self) -> Optional[float]:
        """The model's own guidance where a job gives none (the toy world's, ``anyms.toy.DEFAULT_GUIDANCE``),
        or None: the pipeline's default."""
        return self.sources.get("guidance")

    @property
    def num_adapters(self) -> int:
        """The IP-Adapters the run loads (its --ip-adapter options; the tiny and toy models bring one)."""
        return len(self.sources.get("ip_adapters") or [None])

    def model_record(self) -> dict:
        """The ``"model"`` entry of an image's record."""
        record = dict(self.sources["spec"], dtype=str(self.dtype).replace("torch.", ""))
        if self.max_memory is not None:
            record["max_memory"] = self.max_memory
        return record


def _resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def run_from_args(args, device=None) -> Run:
    """The model and options every image of this command shares (nothing loaded)."""
    chosen = device or args.device
    device, dtype = _resolve_device_dtype(chosen, args.dtype or "auto")
    offload = args.offload or "none"     # None: not given (--max-memory may choose one)
    if offload != "none" and device.type == "cpu":
        why = (f"with --device {args.device}" if args.device != "auto"
               else "this launch runs its processes on CPUs" if chosen != args.device
               else "this machine has no CUDA device, so the run is on the CPU")
        raise UsageError(f"--offload {args.offload} moves models between the CPU and an accelerator; {why}: "
                         f"there is nothing to offload")
    sources = _resolve_sources(args)
    pictures = args.pictures if args.pictures is not None else not args.jobs
    return Run(sources, device, dtype, offload, args.vae_tiling, args.overwrite, pictures)


class _Hub:
    """Whether the Hugging Face Hub can be reached, asked once and only when a Hub id is used: when
    it cannot, everything loads from the local cache (``local_files_only``: no retries, no Hub log
    lines), and an id that is not in the cache is one LoadError naming it and the cause."""

    def __init__(self):
        self._why_not: Optional[str] = None
        self._asked = False

    @property
    def offline(self) -> bool:
        """Asks the Hub if not asked yet."""
        return self.why_offline() is not None

    def known_offline(self) -> bool:
        """Without asking: whether a question asked before found the Hub out of reach."""
        return self._asked and self._why_not is not None

    def why_offline(self) -> Optional[str]:
        if not self._asked:
            self._asked = True
            self._why_not = _why_the_hub_cannot_be_reached()
        return self._why_not

    def require(self, what: str, repo: str, filename: str) -> None:
        """``filename`` of the Hub repo ``repo`` must be in the local cache if the Hub cannot be reached."""
        from huggingface_hub import constants, try_to_load_from_cache

        why = self.why_offline()
        if why is None:
            return
        try:
            cached = try_to_load_from_cache(repo, filename)
        except ValueError:              # not a valid repo id: the loader names it
            return
        if not isinstance(cached, str):
            raise LoadError(f"cannot load {what} {repo!r}: it is not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and {why}; download it where there is a network, "
                            f"or give a local folder")


def _why_the_hub_cannot_be_reached() -> Optional[str]:
    """None if the Hub answers (any HTTP answer, through huggingface_hub's own HTTP client and proxies),
    else why not, in a few words."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:              # any failure to get an answer: DNS, refused, timeout, proxy, TLS
        reason = console.one_line(str(e)) or type(e).__name__
        return f"the Hub ({constants.ENDPOINT}) cannot be reached: no network ({reason[:120]})"
    return None


def _toy_sources(args) -> dict:
    """The shipped toy world: an SD 1.5-style folder and its IP-Adapter, loaded like any local model."""
    from .toy import DEFAULT_GUIDANCE, WEIGHTS_DIR
    from .toy.models import IP_SUBFOLDER, IP_WEIGHT_NAME

    for option in ("ip_adapter", "image_encoder"):
        if getattr(args, option):
            raise UsageError(f"--{option.replace('_', '-')}: --model {TOY_MODEL} brings its own IP-Adapter and "
                             f"image encoder; leave --{option.replace('_', '-')} out")
    if args.arch not in (None, "sd15"):
        raise UsageError(f"--arch {args.arch}: --model {TOY_MODEL} is an SD 1.5-style pipeline; drop --arch")
    return {"model": WEIGHTS_DIR, "ip_adapter": (WEIGHTS_DIR, IP_SUBFOLDER, IP_WEIGHT_NAME), "image_encoder": None,
            "arch": "sd15", "spec": {"arch": "sd15", "model": TOY_MODEL, "ip_adapter": None, "image_encoder": None},
            "guidance": DEFAULT_GUIDANCE}


def _resolve_sources(args) -> dict:
    """Where the model, the IP-Adapter and the image encoder come from, and the pipeline's
    family (``arch``: from --arch, or the model's model_index.json). No model is loaded.
    ``"spec"`` is what an image's record keeps: local paths made absolute, Hub specs as given."""
    if args.model == TOY_MODEL:
        return _toy_sources(args)
    if args.model == TINY_MODEL:
        for option in ("ip_adapter", "image_encoder"):
            if getattr(args, option):
                raise UsageError(f"--{option.replace('_', '-')}: --model {TINY_MODEL} brings its own random IP-Adapter "
                                 f"and image encoder; leave --{option.replace('_', '-')} out")
        arch = args.arch or "sdxl"
        return {"model": TINY_MODEL, "ip_adapter": None, "image_encoder": None, "arch": arch,
                "spec": {"arch": arch, "model": TINY_MODEL, "ip_adapter": None, "image_encoder": None}}
    hub = _Hub()
    arch = _arch_of(args, hub)
    model = args.model or {"sdxl": DEFAULT_MODEL, "flux": DEFAULT_FLUX_MODEL}.get(arch)
    if model is None:
        raise UsageError("--model is required with --arch sd15 (an SD 1.5 model id or local folder)")
    # what must be in the cache if the Hub cannot be reached: asked when loading (load_for_run),
    # after the input is checked (an explicit --model's model_index.json is read now, for its arch)
    needs = [] if os.path.isdir(model) else [("the model", model, "model_index.json")]
    ip_specs = _listed(args.ip_adapter) or [{"sdxl": DEFAULT_IP_ADAPTER, "sd15": DEFAULT_SD15_IP_ADAPTER,
                                             "flux": DEFAULT_FLUX_IP_ADAPTER}[arch]]
    encoder_specs = _listed(args.image_encoder)
    if arch == "flux" and len(ip_specs) > 1:
        raise UsageError(f"--ip-adapter is given {len(ip_specs)} times: FLUX takes one IP-Adapter (several are for "
                         f"SD and SDXL)")
    if encoder_specs and len(ip_specs) > 1 and len(encoder_specs) != len(ip_specs):
        raise UsageError(f"--image-encoder is given {len(encoder_specs)} times for {len(ip_specs)} --ip-adapter: give "
                         f"one per --ip-adapter, in the same order, or none (each adapter's image_encoder folder "
                         f"beside its weights)")
    if len(encoder_specs) > 1 and len(ip_specs) == 1:
        raise UsageError(f"--image-encoder is given {len(encoder_specs)} times for one --ip-adapter: give one")
    ips = []
    for ip_spec in ip_specs:
        if os.path.isdir(ip_spec):
            raise UsageError(f"--ip-adapter {ip_spec!r} is a folder: name the weight file inside it")
        if os.path.isfile(ip_spec):
            ip = (os.path.dirname(os.path.abspath(ip_spec)), "", os.path.basename(ip_spec))
        else:
            ip = _split_hub_spec(ip_spec, "--ip-adapter", need_file=True)
            needs.append(("the IP-Adapter", ip[0], "/".join(p for p in ip[1:] if p)))
        ips.append(ip)
    ip = ips[0]
    if arch == "flux" and not encoder_specs and not os.path.isdir(os.path.join(ip[0], ip[1], "image_encoder")):
        needs.append(("the image encoder of FLUX's IP-Adapter", DEFAULT_FLUX_IMAGE_ENCODER, "config.json"))
    encoders = []
    for encoder_spec in encoder_specs:
        if os.path.isdir(encoder_spec):
            encoder = (encoder_spec, "")
        else:
            encoder = _split_hub_spec(encoder_spec, "--image-encoder", need_file=False)[:2]
            needs.append(("the image encoder", encoder[0], "/".join(p for p in (encoder[1], "config.json") if p)))
        encoders.append(encoder)

    def spec(value):
        return os.path.abspath(value) if value and os.path.exists(value) else value

    several = len(ips) > 1
    # "ip_adapter" / "image_encoder": adapter 0's (the pipeline's own encoder); "ip_adapters" /
    # "image_encoders": every adapter's (an encoder None: the image_encoder folder beside its weights)
    return {"model": model, "ip_adapter": ip, "image_encoder": encoders[0] if encoders else None, "arch": arch,
            "ip_adapters": ips, "image_encoders": encoders or [None] * len(ips),
            "hub": hub, "needs": needs,
            "spec": {"arch": arch, "model": spec(model),
                     "ip_adapter": [spec(v) for v in ip_specs] if several else spec(ip_specs[0]),
                     "image_encoder": ([spec(v) for v in encoder_specs] if several and encoder_specs
                                       else spec(encoder_specs[0]) if encoder_specs else None)}}


def _listed(value) -> list:
    """A repeatable option's values: None -> [], one string -> [it] (a record's), a list as it is."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _arch_of(args, hub: _Hub) -> str:
    """--arch, checked against the family that --model's model_index.json names (read, not loaded)."""
    if not args.model:
        return args.arch or "sdxl"
    named = _model_arch(args.model, hub)
    if named is None:
        if args.arch is None:
            raise UsageError(f"--model {args.model!r}: its model_index.json names no pipeline of {ARCHS}; "
                             f"give --arch")
        return args.arch
    if args.arch is not None and args.arch != named:
        raise UsageError(f"--arch {args.arch} but the model {args.model!r} is a {named} pipeline "
                         f"(its model_index.json): drop --arch or give another --model")
    return named


def _model_arch(model: str, hub: _Hub):
    """``"flux"``, ``"sdxl"``, ``"sd15"`` or None, from the ``_class_name`` of the model's model_index.json."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot load the model {model!r}: no readable model_index.json, not a diffusers "
                            f"pipeline folder ({type(e).__name__}: {e})") from None
    else:
        hub.require("the model", model, "model_index.json")     # before diffusers' import: seconds
        from diffusers import DiffusionPipeline

        try:
            config = DiffusionPipeline.load_config(model, local_files_only=hub.offline)
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot load the model {model!r}: {type(e).__name__}: {e}") from None
    name = str(config.get("_class_name", "")) if isinstance(config, dict) else ""
    if "Flux" in name:
        return "flux"
    if "StableDiffusionXL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion") or name.startswith("AnyMSStableDiffusion"):
        return "sd15"
    return None


def load_for_run(args, run: Run, log=None):
    """Load the run's pipeline quietly (no per-file progress bars), reporting the time."""
    hub = run.sources.get("hub")
    if hub is not None:
        for what, repo, filename in run.sources["needs"]:
            hub.require(what, repo, filename)
        run.sources["offline"] = hub.known_offline()
    t0 = time.perf_counter()
    with _loading_quietly():
        pipe = _load_pipeline(args, run)
    if run.sources["model"] == TINY_MODEL:
        (log or console.info)(f"--model {TINY_MODEL}: the built-in tiny {run.arch} model, with RANDOM weights: "
                              f"the images are noise-like (it shows the command works, not image quality)")
    (log or console.status)(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.1f} s")
    return pipe


def _load_pipeline(args, run: Run):
    from safetensors import SafetensorError

    from .pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline

    sources, dtype = run.sources, run.dtype
    arch = sources.get("arch", args.arch or "sdxl")
    if arch == "flux":
        from .flux import AnyMSFluxPipeline as cls
    else:
        cls = AnyMSStableDiffusionXLPipeline if arch == "sdxl" else AnyMSStableDiffusionPipeline
    if sources["model"] == TINY_MODEL:
        return _place(_tiny_pipeline(cls, arch), run)
    # What a missing, malformed or mismatched checkpoint raises while loading.
    load_errors = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
    # the Hub cannot be reached: the cache only, without asking it (no retries, no log lines)
    offline = {"local_files_only": True} if sources.get("offline") else {}
    kwargs = {_diffusers_dtype_kwarg(): dtype, **offline}
    if sources["image_encoder"]:
        from diffusers.utils import is_transformers_version
        from transformers import CLIPVisionModelWithProjection

        source, subfolder = sources["image_encoder"]
        # transformers renamed torch_dtype to dtype in 4.56 (diffusers' loader makes the same choice)
        dtype_kwarg = {"dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype": dtype}
        try:
            kwargs["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
                source, subfolder=subfolder or "", **dtype_kwarg, **offline)
        except load_errors as e:
            raise LoadError(f"cannot load the image encoder {args.image_encoder!r}: {type(e).__name__}: {e}") from None
    try:
        pipe = cls.from_pretrained(sources["model"], **kwargs)
    except load_errors as e:
        raise LoadError(f"cannot load the model {sources['model']!r}: {type(e).__name__}: {e}") from None
    adapters = sources.get("ip_adapters") or [sources["ip_adapter"]]
    if len(adapters) > 1:
        return _place(_load_adapters(pipe, sources, adapters, dtype, offline, load_errors), run)
    source, subfolder, weight = sources["ip_adapter"]
    ip_kwargs = {}
    if arch == "flux" and getattr(pipe, "image_encoder", None) is None:
        # FLUX's loader reads the image encoder from a path of its own (not beside the weights): the
        # image_encoder folder beside a local adapter, else the CLIP ViT-L/14 of the XLabs adapters.
        local = os.path.join(source, subfolder, "image_encoder")
        ip_kwargs = {"image_encoder_pretrained_model_name_or_path":
                     local if os.path.isdir(local) else DEFAULT_FLUX_IMAGE_ENCODER, "image_encoder_dtype": dtype}
    try:
        pipe.load_ip_adapter(source, subfolder=subfolder, weight_name=weight, **ip_kwargs, **offline)
    except load_errors as e:
        raise LoadError(f"cannot load the IP-Adapter {'/'.join(p for p in (source, subfolder, weight) if p)!r}: "
                        f"{type(e).__name__}: {e}") from None
    return _place(pipe, run)


def _load_adapters(pipe, sources, adapters, dtype, offline, load_errors):
    """Several IP-Adapters (SD, SDXL) by the list form of ``load_ip_adapter``: adapter 0's encoder is
    the pipeline's (--image-encoder, loaded with the model, or the folder beside its weights), and
    every other adapter gets its own where its --image-encoder, or its folder, is another."""
    encoders = sources["image_encoders"]
    given = any(e is not None for e in encoders)
    folders = [None] * len(adapters) if given else ["image_encoder"] * len(adapters)
    names = ", ".join(repr("/".join(p for p in a if p)) for a in adapters)
    try:
        pipe.load_ip_adapter([a[0] for a in adapters], subfolder=[a[1] for a in adapters],
                             weight_name=[a[2] for a in adapters], image_encoder_folder=folders, **offline)
    except load_errors as e:
        raise LoadError(f"cannot load the IP-Adapters {names}: {type(e).__name__}: {e}") from None
    if given:
        from transformers import CLIPVisionModelWithProjection

        for i, (source, subfolder) in enumerate(encoders[1:], start=1):
            if (source, subfolder) == encoders[0]:
                continue                      # adapter 0's: the pipeline's own
            try:
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    source, subfolder=subfolder or "", **_transformers_dtype(dtype), **offline)
            except load_errors as e:
                raise LoadError(f"cannot load the image encoder {'/'.join(p for p in (source, subfolder) if p)!r} "
                                f"of --ip-adapter {i}: {type(e).__name__}: {e}") from None
            pipe.set_ip_adapter_image_encoder(i, encoder)
    return pipe


def _transformers_dtype(dtype) -> dict:
    from diffusers.utils import is_transformers_version

    # transformers renamed torch_dtype to dtype in 4.56 (diffusers' loader makes the same choice)
    return {"dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype": dtype}


def _diffusers_dtype_kwarg() -> str:
    """diffusers >= 0.40 takes ``dtype=`` in from_pretrained and deprecates ``torch_dtype=``."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.40.0") else "torch_dtype"


def _tiny_pipeline(cls, arch: str):
    """The built-in tiny model of ``arch`` (random weights, deterministic, offline)."""
    if arch == "flux":
        from .tiny_flux import tiny_flux_pipeline

        return tiny_flux_pipeline(cls, seed=0)
    from .tiny import tiny_pipeline

    return tiny_pipeline(cls, kind=arch, plus=False, seed=0)


def _place(pipe, run: Run):
    """VAE tiling, then the pipeline on its device and dtype (or CPU offload): the run's options,
    as given or as --max-memory chose them."""
    if pipe.dtype != run.dtype:
        pipe.to(dtype=run.dtype)
    if run.vae_tiling:
        pipe.vae.enable_tiling()
    if run.offload == "model":
        pipe.enable_model_cpu_offload(device=run.device)
    elif run.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=run.device)
    else:
        pipe.to(run.device)
    return pipe


@contextlib.contextmanager
def _loading_quietly():
    """No per-file progress bars from diffusers and transformers while a model loads."""
    restore = []
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = __import__(module, fromlist=["disable_progress_bar"])
        except ImportError:
            continue
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            restore.append(lib.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()


def default_size(pipe) -> Tuple[int, int]:
    """The pipeline's default ``(height, width)`` (what it makes when given neither)."""
    f = pipe.vae_scale_factor
    sample = getattr(pipe, "default_sample_size", None)
    if not sample:
        sample = pipe.unet.config.sample_size
    sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
    return int(sample[0]) * f, int(sample[1]) * f


@contextlib.contextmanager
def threads_for(run: Run):
    """The tiny model and the toy world on a CPU run on one thread: their matrices are too small for
    threads to help (on 2 busy cores, two threads made the tiny model 40x slower), as in the demo."""
    import torch

    if run.sources["spec"]["model"] not in (TINY_MODEL, TOY_MODEL) or run.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
