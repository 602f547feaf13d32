"""User-defined models and data sets in the runner: ``--model package.module:factory``.

A configuration names a model or a data set either by a built-in name (``cnn``, ``digits``, ...)
or by a *factory reference* ``"package.module:function"`` (``"package.module:Class"`` works too,
and ``"module:object.attribute"`` reaches a nested attribute). The module is imported with
:func:`importlib.import_module`; the current working directory is searched after ``sys.path``
(as ``python -m`` would), so a ``my_models.py`` next to where you run ``hessian-lab`` is found.

**The model factory's contract.** It is called once per run, right after
``torch.manual_seed(seed)`` (so its initialization is reproducible), with keyword arguments only:

* ``in_shape`` — the shape of one input (``(C, H, W)`` for images) — and ``num_classes`` — the
  number of classes of the data set — if and only if its signature has parameters of these names;
* ``activation``, ``width``, ``depth`` — if set in the configuration (``--activation``, ...;
  for a factory they are unset by default and then not passed);
* every entry of ``model_options`` (``--model-option KEY=VALUE``, ``model_options = {...}`` in a
  sweep file).

It returns a ``torch.nn.Module`` that maps a batch of inputs ``[N, *in_shape]`` to logits
``[N, num_classes]``; the loss is ``nn.CrossEntropyLoss()``. ADLER and GN need the model in a
deterministic mode: no dropout or batch norm in train mode (build it in ``eval()`` mode if it
has them; the built-in models have neither).

**The data set factory's contract.** It is called with the entries of ``dataset_options``
(``--dataset-option KEY=VALUE``) as keyword arguments, plus ``data_dir`` and ``download`` when
the configuration sets them, plus ``split_seed`` if its signature has a parameter of that name.
It returns either an :class:`~hessian_lab.experiments.datasets.ImageData` or a tuple
``(train_inputs, train_targets, test_inputs, test_targets)`` of tensors (or NumPy arrays):
inputs ``[N, ...]`` floating point, targets ``[N]`` integer class indices; ``num_classes`` is
then ``max(target) + 1``. ``max_train`` / ``max_test`` are applied afterwards.

Every mismatch (a module that does not import, a missing attribute, an argument the factory does
not take, a wrong return type) raises an error that names the factory and what to change.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hessian_lab.experiments.datasets import ImageData

__all__ = [
    "build_model_from_factory",
    "factory_label",
    "factory_parameters",
    "is_factory_reference",
    "load_dataset_from_factory",
    "resolve_factory",
]


def is_factory_reference(name: object) -> bool:
    """Whether ``name`` looks like ``"package.module:attribute"`` (instead of a built-in name)."""
    return isinstance(name, str) and ":" in name


def factory_label(reference: str) -> str:
    """The attribute part of ``"package.module:attribute"``, for run names (``attribute``)."""
    return reference.rpartition(":")[2].rpartition(".")[2] or reference


def resolve_factory(reference: str, what: str = "model") -> Callable[..., Any]:
    """Import ``"package.module:attribute"`` and return the attribute.

    Args:
        reference: ``"module:attribute"``; the attribute may be dotted (``"module:Class.build"``).
        what: ``"model"`` or ``"dataset"``, for the error messages.

    Raises:
        ValueError: Malformed reference, module not importable, attribute missing or not callable.
    """
    module_name, sep, attr_path = reference.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"--{what} {reference!r}: a factory is given as package.module:function "
            f"(e.g. my_models:make_{what})"
        )
    try:
        module = _import(module_name)
    except ImportError as err:
        raise ValueError(
            f"--{what} {reference!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {err}); make it importable: install its package, add its "
            "folder to PYTHONPATH, or run from the folder that holds it"
        ) from err
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(
                n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))
            )
            shown = ", ".join(public[:20]) + (", ..." if len(public) > 20 else "")
            raise ValueError(
                f"--{what} {reference!r}: {module_name!r} has no attribute {attr_path!r}; "
                f"its callables: {shown or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--{what} {reference!r}: {attr_path} is not callable")
    return obj


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        top = module_name.partition(".")[0]
        if err.name != top or cwd in sys.path or "" in sys.path:
            raise
        # Not found on sys.path: look in the current directory too, as `python -m` does.
        sys.path.append(cwd)
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError:
            sys.path.remove(cwd)
            raise err from None


def factory_parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """The factory's keyword-usable parameter names, and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: accept anything
        return set(), True
    names = {
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return names, var_kw


def _check_call(
    factory: Callable[..., Any], reference: str, what: str, kwargs: Mapping[str, Any]
) -> None:
    """Raise a clear ``ValueError`` if ``factory(**kwargs)`` does not bind to its signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        params = ", ".join(signature.parameters) or "none"
        raise ValueError(
            f"--{what} {reference}: cannot call it with {', '.join(sorted(kwargs)) or 'no'} "
            f"keyword arguments ({err}); its parameters are: {params}. Pass its options with "
            f"--{what}-option KEY=VALUE ({what}_options in a sweep file), and leave out the "
            "settings it does not take"
        ) from None


def model_factory_kwargs(
    reference: str,
    in_shape: tuple[int, ...] | None,
    num_classes: int | None,
    settings: Mapping[str, Any],
    options: Mapping[str, Any],
) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """Resolve a model factory and the keyword arguments it will receive (checked).

    Args:
        reference: ``"module:factory"``.
        in_shape: Shape of one input (None: not known yet, skip it in the check).
        num_classes: Number of classes (None: not known yet).
        settings: ``activation``, ``width``, ``depth`` that are set (not None).
        options: ``model_options``.

    Raises:
        ValueError: The factory cannot be imported or does not take these arguments.
    """
    factory = resolve_factory(reference, "model")
    names, _ = factory_parameters(factory)
    kwargs: dict[str, Any] = {}
    for key, value in (("in_shape", in_shape), ("num_classes", num_classes)):
        if key in options:
            raise ValueError(
                f"--model {reference}: {key} is given to the factory by the runner (from the "
                f"data set); remove it from the model options"
            )
        if key in names:
            kwargs[key] = value  # None while only checking the call, before the data is loaded
    kwargs.update(settings)
    kwargs.update(options)
    _check_call(factory, reference, "model", kwargs)
    return factory, kwargs


def build_model_from_factory(
    reference: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    settings: Mapping[str, Any],
    options: Mapping[str, Any],
) -> nn.Module:
    """Call the model factory under the contract of this module's docstring.

    Raises:
        ValueError: Import or signature problems.
        TypeError: The factory did not return an ``nn.Module``.
    """
    factory, kwargs = model_factory_kwargs(reference, in_shape, num_classes, settings, options)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"--model {reference} returned {type(model).__name__}; a model factory must "
            "return a torch.nn.Module"
        )
    return model


def dataset_factory_kwargs(
    reference: str,
    options: Mapping[str, Any],
    data_dir: str | None,
    download: bool,
    split_seed: int,
) -> tuple[Callable[..., Any], dict[str, Any], bool]:
    """Resolve a data set factory and its keyword arguments (checked).

    Returns:
        The factory, its keyword arguments, and whether it takes ``split_seed``.
    """
    factory = resolve_factory(reference, "dataset")
    names, _ = factory_parameters(factory)
    kwargs = dict(options)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    if download:
        kwargs["download"] = True
    takes_seed = "split_seed" in names
    if takes_seed and "split_seed" not in options:
        kwargs["split_seed"] = split_seed
    _check_call(factory, reference, "dataset", kwargs)
    return factory, kwargs, takes_seed


def load_dataset_from_factory(
    reference: str,
    options: Mapping[str, Any],
    *,
    data_dir: str | None = None,
    download: bool = False,
    split_seed: int = 0,
) -> ImageData:
    """Call the data set factory and check what it returned (see the module docstring).

    Raises:
        ValueError: Import or signature problems, or malformed data.
        TypeError: The factory returned something other than ``ImageData`` or a 4-tuple.
    """
    factory, kwargs, _ = dataset_factory_kwargs(reference, options, data_dir, download, split_seed)
    out = factory(**kwargs)
    if isinstance(out, ImageData):
        data = out
    elif isinstance(out, tuple | list) and len(out) == 4:
        tensors = [torch.as_tensor(a) for a in out]
        train_x, train_y, test_x, test_y = tensors
        if not (_is_int(train_y) and _is_int(test_y)):
            raise ValueError(
                f"--dataset {reference}: targets must be integer class indices, got "
                f"{train_y.dtype} and {test_y.dtype}"
            )
        num_classes = int(max(train_y.max(), test_y.max()).item()) + 1 if len(train_y) else 0
        data = ImageData(
            factory_label(reference),
            train_x.float() if not train_x.is_floating_point() else train_x,
            train_y.long(),
            test_x.float() if not test_x.is_floating_point() else test_x,
            test_y.long(),
            num_classes,
        )
    else:
        raise TypeError(
            f"--dataset {reference} returned {type(out).__name__}; a data set factory must "
            "return an ImageData or a tuple (train_inputs, train_targets, test_inputs, "
            "test_targets)"
        )
    _check_data(data, reference)
    return data


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_data(data: ImageData, reference: str) -> None:
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_inputs"), getattr(data, f"{split}_targets")
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"--dataset {reference}: {split} inputs must be [N, ...] and targets [N] with "
                f"N >= 1, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
    if data.train_inputs.shape[1:] != data.test_inputs.shape[1:]:
        raise ValueError(
            f"--dataset {reference}: train and test inputs differ in shape "
            f"({tuple(data.train_inputs.shape[1:])} vs {tuple(data.test_inputs.shape[1:])})"
        )
    if data.num_classes < 2:
        raise ValueError(f"--dataset {reference}: needs at least 2 classes, got {data.num_classes}")
