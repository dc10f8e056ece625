"""Every registered architecture follows the model interface of ``models/interface.py``.

Each one is built from a tiny config through ``build_model`` and initialised abstractly
(``jax.eval_shape``: nothing is compiled). Checked: the required calls and their output shapes;
each optional hook it has, with the declared types (loss groups callable with the declared
arguments, staging's stage-one model with the same parameter tree and reset prefixes that exist
in it, interaction and decoder hooks); and that no model or part carries a hook-like attribute
that the interface does not declare. Also: every registered part kind has one registry, and
every family builds its parts through them.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import pytest

from mtl_jax import staging
from mtl_jax.models import ARCHITECTURES, DECODERS, ENCODERS, INTERACTIONS, build_model, interface
from mtl_jax.models.interface import (
    HasLossGroups,
    LossGroups,
    MultiTaskNet,
    SideAligned,
    Staged,
    StagedDecoder,
)

SEG = {"semseg": 5, "depth": 1}
PYRAMID_TINY = dict(encoder="resnet18", encoder_kwargs=dict(width=4),
                    decoder_kwargs=dict(features=8))
DENSEMTL_TINY = dict(encoder="resnet18", encoder_kwargs=dict(
    width=4, replace_stride_with_dilation=(False, False, True)), decoder="three_ways",
    decoder_kwargs=dict(channels=(4, 8, 8, 8, 8), side_scales=(1,)))

#: (architecture, variant label, config.model, tasks): every architecture at least once.
CASES = [
    ("multitask", "mtl", PYRAMID_TINY, SEG),
    ("multitask", "padnet", dict(PYRAMID_TINY, decoder="padnet", decoder_kwargs=dict(width=8),
                                 interaction=dict(name="padnet", width=8)), SEG),
    ("multitask", "mteb", dict(DENSEMTL_TINY, exchange=dict(name="mteb", stages=(1,))), SEG),
    ("adamt", "adamt", dict(widths=(4, 8, 8, 8), bottleneck_features=8), SEG),
    ("xtasc", "xtasc", dict(encoder="resnet18", encoder_kwargs=dict(width=4),
                            decoder_kwargs=dict(features=8, hidden_features=4),
                            ttnet_kwargs=dict(features=(4, 8, 8))), SEG),
    ("segnet_split", "split", dict(width=4), SEG),
    ("segnet_dense", "dense", dict(width=4), SEG),
    ("segnet_cross_stitch", "cross_stitch", dict(width=4), SEG),
    ("segnet_padnet", "padnet", dict(width=4, initial_heads=True), SEG),
    ("segnet_mtan", "mtan", dict(width=4), SEG),
    ("segnet_atinet", "atinet", dict(width=4, stage_switch=0.5), SEG),
]
IMAGE = (2, 32, 64, 3)

#: every attribute name an optional hook may have, from the interface's declarations.
DECLARED = {name for proto in (HasLossGroups, Staged, SideAligned, StagedDecoder)
            for name in [*vars(proto), *proto.__annotations__] if not name.startswith("_")}
HOOK_PREFIXES = ("loss_", "stage_", "side_", "stage")


def test_cases_cover_every_architecture():
    assert {arch for arch, *_ in CASES} == set(ARCHITECTURES)


def _abstract_init(model):
    image = jax.ShapeDtypeStruct(IMAGE, jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0),
                                                "dropout": jax.random.key(1)}, x, train=False),
                          image)


def _tree_shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _undeclared_hooks(obj) -> list[str]:
    names = [n for n in dir(type(obj)) if not n.startswith("_")]
    return sorted(n for n in names if n.startswith(HOOK_PREFIXES) and n not in DECLARED)


def _parts(model):
    """The model's decoders, its interaction and its exchange blocks (unbound templates)."""
    parts = list(model.decoders.values())
    if model.interaction is not None:
        parts.append(model.interaction)
    parts += [block for _, block in getattr(model, "exchanges", ())]
    return parts


@pytest.mark.parametrize("arch,label,cfg,tasks", CASES, ids=[f"{a}-{v}" for a, v, *_ in CASES])
def test_architecture_follows_the_interface(arch, label, cfg, tasks):
    model = build_model(dict(cfg, architecture=arch), tasks)
    assert isinstance(model, MultiTaskNet)
    assert model.tasks == tuple(tasks)
    variables = _abstract_init(model)
    assert "encoder" in variables["params"]

    image = jax.ShapeDtypeStruct(IMAGE, jnp.float32)
    preds, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, image)
    assert set(preds) == set(tasks)  # (eval_shape returns dicts with sorted keys)
    for task, channels in tasks.items():
        assert preds[task].shape == (*IMAGE[:3], channels) and preds[task].dtype == jnp.float32
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, method=model.encode),
                           variables, image)
    preds2, _ = jax.eval_shape(lambda v, f: model.apply(v, f, IMAGE[1:3], train=False,
                                                        method=model.decode), variables, feats)
    assert _tree_shapes(preds2) == _tree_shapes(preds)

    # Optional hooks: present ones have the declared types; no undeclared hook-like names.
    assert _undeclared_hooks(model) == []
    groups = interface.loss_groups_of(model)
    if groups is not None:
        assert isinstance(model, HasLossGroups)
        declared = list(inspect.signature(LossGroups.__call__).parameters)[1:]
        assert list(inspect.signature(groups).parameters) == declared
    if isinstance(model, Staged):
        assert isinstance(model.stage_switch, float) and staging.is_staged(model)
        one = model.stage_one()
        assert isinstance(one, MultiTaskNet)
        # stage one runs on the full model's variables (a subset of them is used)
        full = dict(jax.tree_util.tree_leaves_with_path(_tree_shapes(variables),
                                                        is_leaf=lambda x: isinstance(x, tuple)))
        own = jax.tree_util.tree_leaves_with_path(_tree_shapes(_abstract_init(one)),
                                                  is_leaf=lambda x: isinstance(x, tuple))
        assert own and all(full.get(path) == leaf for path, leaf in own)
        preds1, _ = jax.eval_shape(lambda v, x: one.apply(v, x, train=False), variables, image)
        assert _tree_shapes(preds1) == _tree_shapes(preds)
        prefixes = model.stage_reset_prefixes()
        assert prefixes and all(isinstance(p, str) for p in prefixes)
        paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])]
        for prefix in prefixes:  # each names parameters of the model
            assert any(staging.under_prefixes(path, (prefix,)) for path in paths), prefix
    else:
        assert not staging.is_staged(model)
    for part in _parts(model):
        assert _undeclared_hooks(part) == [], type(part).__name__
        if isinstance(part, SideAligned):
            assert isinstance(part.side_align_corners, bool)
        if interface.is_staged_decoder(part):
            assert isinstance(part, StagedDecoder)
            assert all(isinstance(s, int) for s in part.stage_order)


def test_registries_have_one_entry_per_name_and_slot():
    for registry in (ENCODERS, DECODERS, INTERACTIONS):
        entries = registry.entries()
        assert len({(s, n) for s, n, _ in entries}) == len(entries)
        assert all(s in registry.slots for s, _, _ in entries)
    # the composed architecture only takes parts from the pyramid / exchange slots
    with pytest.raises(ValueError, match=r"unknown encoder 'segnet'; valid: \[.*resnet18"):
        build_model(dict(architecture="multitask", encoder="segnet"), SEG)
    with pytest.raises(ValueError, match=r"unknown interaction 'mtan'; valid: \['padnet'\]"):
        build_model(dict(PYRAMID_TINY, interaction=dict(name="mtan")), SEG)
    with pytest.raises(ValueError, match=r"unknown exchange block 'ttnet'; valid: \['mteb', "
                                         r"'padnet'\]"):
        build_model(dict(DENSEMTL_TINY, exchange=dict(name="ttnet")), SEG)


def test_every_family_builds_its_parts_through_the_registries():
    """Each part class of every architecture is an entry of a part registry (or, for a
    SegNet latent module, an ``INTERACTIONS`` entry inside its encoder)."""
    registered_types = {build if isinstance(build, type) else type(build())
                        for reg in (ENCODERS, DECODERS, INTERACTIONS)
                        for _, _, build in reg.entries()}
    for arch, _, cfg, tasks in CASES:
        model = build_model(dict(cfg, architecture=arch), tasks)
        parts = [model.encoder, *_parts(model)]
        if getattr(model.encoder, "latent", None) is not None:
            parts.append(model.encoder.latent)
        parts += [net for _, _, net in getattr(model, "transfers", ())]
        for part in parts:
            assert type(part) in registered_types, (arch, type(part).__name__)
