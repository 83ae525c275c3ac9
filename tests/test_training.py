"""Activation and optimizer-state offload on a small transformer: bitwise equal to no offload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import small_config
from daemon import Daemon
from torch.utils.checkpoint import checkpoint

import tierd

MIB = 1 << 20


class TinyTransformer(torch.nn.Module):
    """A few million parameters: embedding, encoder layers, a head."""

    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(d, vocab)
        self.use_checkpoint = use_checkpoint

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            if self.use_checkpoint and i % 2 == 0:
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return self.head(h)


def _model(seed: int = 0, **kw: object) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**kw)  # type: ignore[arg-type]


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(step))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.view(torch.uint8) if x.dtype != torch.bool else x,
                                                y.view(torch.uint8) if y.dtype != torch.bool else y) for x, y in zip(a, b, strict=True))


@pytest.fixture(params=["embedded", "daemon"], scope="module")
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tierd.Store]:
    nvme = tmp_path_factory.mktemp("nvme")
    if request.param == "embedded":
        with tierd.open(small_config(nvme, host="256MiB", nvme="1GiB")) as s:
            yield s
        return
    d = Daemon(nvme, host="256MiB", nvme="1GiB").start()
    try:
        with d.connect() as s:
            yield s
    finally:
        d.stop()
        d.close()


# -- activations --------------------------------------------------------------------


@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_activation_offload_gives_bitwise_equal_gradients(store: tierd.Store, use_checkpoint: bool) -> None:
    model = _model(use_checkpoint=use_checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n_params < 10_000_000
    tokens = _batch(0)
    _loss(model, tokens).backward()
    expected = _grads(model)

    model.zero_grad()
    before = store.stats().objects
    with tierd.offload_activations(store, min_bytes=64 << 10) as ctx:
        loss = _loss(model, tokens)
    # The stashed bytes left the autograd graph: they are objects in the store now.
    assert ctx.stashed_bytes > 8 * MIB
    assert store.stats().objects > before
    loss.backward()
    assert _bitwise(_grads(model), expected)
    del loss
    assert store.stats().objects == before  # every stash deleted once backward was done


def test_retain_graph_unpacks_twice(store: tierd.Store) -> None:
    model = _model(layers=2)
    tokens = _batch(1)
    loss = _loss(model, tokens)
    loss.backward(retain_graph=True)
    loss.backward()
    expected = _grads(model)  # two backwards accumulate

    model.zero_grad()
    with tierd.offload_activations(store, min_bytes=64 << 10):
        loss = _loss(model, tokens)
    loss.backward(retain_graph=True)
    loss.backward()
    assert _bitwise(_grads(model), expected)


def test_double_backward(store: tierd.Store) -> None:
    torch.manual_seed(3)
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(256, 512)

    def second_order() -> torch.Tensor:
        y = torch.tanh(x @ w) * (x @ w).sigmoid()
        (g,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), w)
        return gg

    expected = second_order()
    with tierd.offload_activations(store, min_bytes=1024):
        got = second_order()
    assert torch.equal(got, expected)


def test_views_strides_and_a_tensor_saved_twice(store: tierd.Store) -> None:
    torch.manual_seed(4)
    a = torch.randn(1024, 512, requires_grad=True)

    def f() -> tuple[torch.Tensor, torch.Tensor]:
        h = a * 2  # a non-leaf: stashed
        t = h.t()  # a view with other strides, saved by the matmul below
        y = (t @ h).sum() + (h * h).sum()  # h saved twice by the mul
        (g,) = torch.autograd.grad(y, a)
        return y, g

    _, expected = f()
    with tierd.offload_activations(store, min_bytes=1024) as ctx:
        _, got = f()
    assert torch.equal(got, expected)
    assert ctx.stashed_bytes == 1024 * 512 * 4  # one storage, however often it was saved


def test_small_and_leaf_tensors_stay(store: tierd.Store) -> None:
    w = torch.randn(64, 64, requires_grad=True)  # a leaf: never stashed
    with tierd.offload_activations(store, min_bytes=1 << 20) as ctx:
        y = (w @ w).sum()  # saved tensors are leaves or small
    y.backward()
    assert ctx.stashed_bytes == 0


# -- optimizer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(torch.optim.AdamW, {"lr": 1e-3}), (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
     (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})],
    ids=["adamw", "adam-amsgrad", "sgd-momentum"],
)
def test_offloaded_optimizer_matches_plain_bitwise(store: tierd.Store, cls: type, kwargs: dict) -> None:
    plain_model, off_model = _model(layers=2), _model(layers=2)
    plain = cls(plain_model.parameters(), **kwargs)
    off = tierd.offload_optimizer(cls(off_model.parameters(), **kwargs), store)
    try:
        for step in range(20):
            tokens = _batch(step)
            for model, opt in ((plain_model, plain), (off_model, off)):
                opt.zero_grad()
                _loss(model, tokens).backward()
                opt.step()
            if step == 10:
                # Between steps the state is in the store, not in the optimizer.
                assert off.offloaded_bytes() > 4 * MIB
                big = [v for st in off.optimizer.state.values() for v in st.values()
                       if isinstance(v, torch.Tensor) and v.numel() * v.element_size() >= 4096]
                assert big == []
        assert _bitwise(list(off_model.parameters()), list(plain_model.parameters()))
        # state_dict / load_state_dict behave as the wrapped optimizer's.
        sd_plain, sd_off = plain.state_dict(), off.state_dict()
        assert sd_off["param_groups"] == sd_plain["param_groups"]
        for idx, st in sd_plain["state"].items():
            for name, value in st.items():
                assert torch.equal(torch.as_tensor(sd_off["state"][idx][name]), torch.as_tensor(value)), name
        fresh = tierd.offload_optimizer(cls(_model(layers=2).parameters(), **kwargs), store)
        fresh.load_state_dict(sd_plain)
        assert fresh.offloaded_bytes() == off.offloaded_bytes()
        fresh.close()
    finally:
        off.close()


def test_optimizer_state_is_prefetched_during_backward(store: tierd.Store) -> None:
    model = _model(layers=2)
    off = tierd.offload_optimizer(torch.optim.AdamW(model.parameters()), store)
    try:
        for step in range(2):
            off.zero_grad()
            _loss(model, _batch(step)).backward()
            if step == 1:
                # The post-accumulate-grad hooks started fetching before step().
                assert len(off._pending) == len(off._offloaded) > 0  # noqa: SLF001
            off.step()
    finally:
        off.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_round_trip(store: tierd.Store) -> None:
    model = _model(layers=2).cuda()
    tokens = _batch(0).cuda()
    _loss(model, tokens).backward()
    expected = _grads(model)
    model.zero_grad()
    with tierd.offload_activations(store, min_bytes=64 << 10):
        loss = _loss(model, tokens)
    loss.backward()
    assert _bitwise(_grads(model), expected)
    opt = tierd.offload_optimizer(torch.optim.AdamW(model.parameters()), store)
    opt.step()
    opt.step()
    assert all(v.is_cuda for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim())
    opt.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_activations_leave_the_device(store: tierd.Store) -> None:
    model = _model(layers=4).cuda()
    tokens = _batch(0).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = _loss(model, tokens)
    plain = torch.cuda.memory_allocated() - base
    loss.backward()
    expected = _grads(model)
    model.zero_grad()
    del loss
    with tierd.offload_activations(store, min_bytes=64 << 10) as ctx:
        loss = _loss(model, tokens)
    ctx.flush()
    offloaded = torch.cuda.memory_allocated() - base
    assert ctx.stashed_bytes > 0 and offloaded < 0.6 * plain, (offloaded, plain)
    loss.backward()
    assert _bitwise(_grads(model), expected)


def test_bad_arguments(store: tierd.Store) -> None:
    with pytest.raises(tierd.InvalidArgument, match="min_bytes"):
        tierd.offload_activations(store, min_bytes=-1)


def test_example_model_size(tmp_path: Path) -> None:
    assert sum(p.numel() for p in _model().parameters()) > 2_000_000
