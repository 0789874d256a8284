"""A Mamba (S6) block, state_dict-compatible with mamba_ssm.modules.mamba_simple.Mamba.

Parameters and their names equal mamba_ssm's (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj), so weights load both ways. `forward` runs a whole sequence; `step` advances one
token with mamba_ssm's cache semantics (conv_state holds the last d_conv conv inputs,
ssm_state the SSM hidden state). On CUDA with mamba_ssm installed its fused kernels are used;
everywhere else the pure-PyTorch scan in model/ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.ops.selective_scan import selective_scan_cpu

try:  # mamba_ssm imports its CUDA extension at import time: absent on CPU-only machines.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except Exception:  # noqa: BLE001 - any failure means "no kernels here"
    _cuda_selective_scan = None
try:
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d
except Exception:  # noqa: BLE001
    _cuda_causal_conv1d = None


def cuda_kernels_available() -> bool:
    return _cuda_selective_scan is not None and torch.cuda.is_available()


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_kernels: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_kernels = use_kernels

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv,
                                groups=self.d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        # mamba_ssm's initialisation: dt in [dt_min, dt_max] log-uniformly through the bias
        # (inverse softplus), S4D-real A = -(1..d_state), D = 1.
        dt_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    # -- full sequence -------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (batch, length, d_model) -> same shape."""
        return self._parallel(hidden_states)[0]

    @torch.no_grad()
    def prefill(self, hidden_states: torch.Tensor, lengths: torch.Tensor):
        """The parallel forward that also returns the step caches after each row's last valid
        position: (output, conv_state, ssm_state), equal to `step` over positions 0..len-1.
        Rows are right-padded; `lengths` (batch,) counts each row's valid positions."""
        return self._parallel(hidden_states, lengths)

    def _parallel(self, hidden_states: torch.Tensor, lengths: torch.Tensor | None = None):
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)          # (b, 2*d_inner, l)
        x, z = xz.chunk(2, dim=1)
        conv_state = None
        if lengths is not None:    # the last d_conv conv inputs of each row, zeros before it
            padded = F.pad(x, (self.d_conv, 0))
            index = lengths.view(-1, 1, 1) + torch.arange(self.d_conv, device=x.device)
            conv_state = padded.gather(2, index.expand(-1, self.d_inner, -1)).contiguous()
        A = -torch.exp(self.A_log.float())
        on_kernels = self.use_kernels and x.is_cuda and _cuda_selective_scan is not None
        if on_kernels and _cuda_causal_conv1d is not None:
            x = _cuda_causal_conv1d(x.contiguous(), self.conv1d.weight.squeeze(1),
                                    self.conv1d.bias, activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))                    # (b, l, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)    # bias goes in as delta_bias
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        scan = _cuda_selective_scan if on_kernels else selective_scan_cpu
        if lengths is None:
            y = scan(x.contiguous(), delta.contiguous(), A, B, C, self.D.float(),
                     z=z.contiguous(), delta_bias=self.dt_proj.bias.float(),
                     delta_softplus=True)
            return self.out_proj(y.transpose(1, 2)), None, None
        # delta = 0 past a row's end makes exp(delta A) = 1 and delta B u = 0: the SSM state
        # stops changing there, so the scan's last state is the state after the last valid item.
        delta = F.softplus(delta + self.dt_proj.bias.float()[None, :, None])
        valid = torch.arange(length, device=x.device) < lengths.view(-1, 1)
        delta = delta * valid.unsqueeze(1)
        y, ssm_state = scan(x.contiguous(), delta.contiguous(), A, B, C, self.D.float(),
                            z=z.contiguous(), delta_softplus=False, return_last_state=True)
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state.float()

    # -- one token at a time -------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype=None, device=None):
        device = device or self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=dtype or self.conv1d.weight.dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=dtype or self.dt_proj.weight.dtype)
        return conv_state, ssm_state

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor,
             ssm_state: torch.Tensor):
        """hidden_states: (batch, 1, d_model). Updates the states in place, as mamba_ssm does."""
        xz = self.in_proj(hidden_states.squeeze(1))               # (b, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = torch.sum(conv_state * self.conv1d.weight.squeeze(1), dim=-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight) + self.dt_proj.bias)
        A = -torch.exp(self.A_log.float())
        dA = torch.exp(dt.unsqueeze(-1) * A)                      # (b, d_inner, n)
        dBx = (dt * x).unsqueeze(-1) * B.unsqueeze(1)
        ssm_state.copy_(ssm_state * dA + dBx)
        y = torch.matmul(ssm_state, C.unsqueeze(-1)).squeeze(-1) + self.D * x
        y = y * F.silu(z)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state
