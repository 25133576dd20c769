"""The weight delta of one adapted layer, for each algorithm in circulation (LoRA, LoCon with Tucker, LyCORIS'
LoHa, LoKr and full difference), and DoRA's rescale of the merged weight.

Pure tensor math on a layer's parts as the files name them (kohya / LyCORIS suffixes without the dot). The
algorithm follows from which parts are present; the result is the unscaled delta, shaped like the weight.
Scaling, as kohya, LyCORIS and A1111 agree: alpha / rank, with rank the low-rank dimension (lora_down's,
hada_w1_b's, lokr_w1_b's or lokr_w2_b's first axis); no alpha (or 0) and the full-rank algorithms scale by 1.

Shapes:
- LoRA / LoCon: up (out, r[, 1, 1]) @ down (r, in[, kh, kw]); Tucker: down (r, in, 1, 1), mid (r, r, kh, kw),
  up (out, r, 1, 1), delta[o, c] = up[o, i] mid[i, j] down[j, c].
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) elementwise, w*_a (out, r), w*_b (r, in * kh * kw); with Tucker
  each factor is t (r, r, kh, kw) contracted with w_a (r, out) and w_b (r, in).
- LoKr: kron(w1, w2), each side full or a product w_a @ w_b; w2 may carry the kernel (out2, in2, kh, kw),
  directly, as w2_b (r, in2, kh, kw), or through a Tucker core t2 with w2_a (r, out2), w2_b (r, in2).
- full: `diff`, the delta itself (and `diff_b`, the bias's).
- DoRA (the magnitude m): W' = m * W / ||W|| with W = W0 + scale * delta, the norm over each output row or
  each input column. LyCORIS' `dora_scale` says which by its shape: (out, 1, ...) for rows (its default since
  its wd_on_out option), (1, in, ...) for columns (the first LyCORIS DoRA files); peft's
  `lora_magnitude_vector` is always per output row ((out,), a convolution's (1, out, 1, 1)). A strength s
  moves the weight the fraction s of the way: W0 + s * (W' - W0), as ComfyUI does (at s = 1 this is LyCORIS'
  own DoRA weight, tested; below 1 the implementations in circulation differ).
"""

import torch

# the parts each algorithm needs (ALGORITHMS) and may have (OPTIONAL); COMMON ones may join any
ALGORITHMS = {"lora": ("lora_down.weight", "lora_up.weight"),
              "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "lokr": (), "full": ("diff",)}
OPTIONAL = {"lora": ("lora_mid.weight",), "loha": ("hada_t1", "hada_t2"),
            "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
            "full": ("diff_b",)}
COMMON = ("alpha", "dora_scale", "magnitude")  # magnitude: peft's DoRA


def algorithm(parts: dict) -> str:
    """The algorithm a layer's parts make; ValueError naming what is missing or mixed."""
    found = {name for name in ALGORITHMS if any(p in parts for p in ALGORITHMS[name] + OPTIONAL[name])}
    if len(found) != 1:
        raise ValueError(f"its parts {sorted(parts)} make no single known algorithm" if found else
                         f"its parts {sorted(parts)} are no LoRA/LyCORIS algorithm's")
    name = found.pop()
    missing = [p for p in ALGORITHMS[name] if p not in parts]
    if name == "lokr":
        missing = [f"lokr_{w} or lokr_{w}_a/_b" for w in ("w1", "w2")
                   if f"lokr_{w}" not in parts and not (f"lokr_{w}_a" in parts and f"lokr_{w}_b" in parts)]
    if name == "loha" and ("hada_t1" in parts) != ("hada_t2" in parts):
        missing = ["hada_t1 and hada_t2 (both or neither)"]
    if missing:
        raise ValueError(f"it is {name} but lacks {', '.join(missing)}")
    unknown = sorted(set(parts) - set(ALGORITHMS[name] + OPTIONAL[name] + COMMON))
    if unknown:
        raise ValueError(f"it is {name} but also holds {unknown}")
    return name


def rank(name: str, parts: dict) -> int | None:
    """The low-rank dimension alpha is divided by; None for full-rank layers (scale 1)."""
    if name == "lora":
        return parts["lora_down.weight"].shape[0]
    if name == "loha":
        return parts["hada_w1_b"].shape[0]
    if name == "lokr":
        b = parts.get("lokr_w1_b", parts.get("lokr_w2_b"))
        return None if b is None else b.shape[0]
    return None


def scale(name: str, parts: dict) -> float:
    alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
    r = rank(name, parts)
    return alpha / r if alpha and r else 1.0


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """core t (r1, r2, k...) with a (r1, out) and b (r2, in): (out, in, k...)."""
    return torch.einsum("ij...,io,jc->oc...", t, a, b)


def delta(name: str, parts: dict) -> torch.Tensor:
    """The unscaled weight delta, in fp32, in the shape the parts give (flattened kernels stay flattened:
    the caller reshapes to the weight)."""
    p = {k: v.float() for k, v in parts.items()}
    if name == "lora":
        up, down = p["lora_up.weight"].flatten(1), p["lora_down.weight"]
        if "lora_mid.weight" in p:
            return _tucker(p["lora_mid.weight"], up.T, down.flatten(1))
        return up @ down.flatten(1)
    if name == "loha":
        if "hada_t1" in p:
            return (_tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                    * _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]))
        return (p["hada_w1_a"] @ p["hada_w1_b"].flatten(1)) * (p["hada_w2_a"] @ p["hada_w2_b"].flatten(1))
    if name == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            b = p["lokr_w2_b"]
            w2 = (p["lokr_w2_a"] @ b.flatten(1)).reshape(-1, *b.shape[1:])
        w1 = w1.reshape(*w1.shape, *(1,) * (w2.dim() - w1.dim()))  # a conv's kernel lives in w2
        return torch.kron(w1.contiguous(), w2.contiguous())
    return p["diff"]


def dora(merged: torch.Tensor, magnitude: torch.Tensor, per_output: bool | None = None) -> torch.Tensor:
    """DoRA's weight: `merged` (W0 + scale * delta) rescaled to the magnitude, by output row or input column.
    `per_output` None: as the magnitude's shape says ((out, 1, ...) or (1, in, ...), LyCORIS' dora_scale);
    True: by output row whatever its shape (peft's lora_magnitude_vector: (out,), a convolution's (1, out, 1, 1)).
    ValueError if the magnitude fits no such shape."""
    out, inp = merged.shape[:2]
    kernel = (1,) * (merged.dim() - 2)
    m = magnitude.float()
    if per_output is None:
        per_output = m.dim() >= 1 and m.shape[0] == out and m.numel() == out
        if not per_output and not (m.dim() >= 2 and m.shape[1] == inp and m.numel() == inp):
            raise ValueError(f"dora_scale {tuple(m.shape)} fits neither the weight's {out} output rows nor its "
                             f"{inp} input columns")
    elif m.numel() != out:
        raise ValueError(f"lora_magnitude_vector {tuple(m.shape)} does not hold the weight's {out} output rows")
    if per_output:
        norm = merged.flatten(1).norm(dim=1).reshape(out, 1, *kernel)
        m = m.reshape(out, 1, *kernel)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, inp, *kernel)
        m = m.reshape(1, inp, *kernel)
    return merged * (m / (norm + torch.finfo(torch.float32).eps))  # eps as LyCORIS and ComfyUI add it
