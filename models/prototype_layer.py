"""The prototype layer: prototypes in the latent space, their distances to every latent patch, and their provenance.

Chen et al., "This Looks Like That", NeurIPS 2019. A prototype is a vector in the latent space; its distance to every
latent patch is computed with the expansion ``||z||^2 - 2 z.p + ||p||^2`` (the ``z.p`` term is a 1x1 convolution,
written as one matrix product so it serves 2D and 3D), never by materialising patch pairs.
Similarity is ``log((d + 1) / (d + eps))``. Push (:mod:`pellucid.training.prototypes.push`) replaces prototypes by
training patches and records where they came from (:class:`PrototypeSource`); that provenance lives in the layer's
extra state, so it travels with ``state_dict`` and every Lightning checkpoint. The networks built on it are in
:mod:`pellucid.models.prototypes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

PrototypeMetric = Literal["l2", "cosine"]
_EXTRA_STATE_VERSION = 1


@dataclass
class PrototypeSource:
    """Where a pushed prototype came from (its provenance).

    Attributes:
        sample_id: ``id`` of the training sample.
        sample_index: Index of the sample in the push dataset.
        label: Class index of the sample (first positive class for multi-label targets).
        feature_index: Coordinates of the latent patch in the feature map.
        feature_size: Size of that feature map.
        image_center: Center of the patch's footprint in image pixel/voxel coordinates.
        image_box: ``(start, stop)`` of the footprint per image axis.
        distance: Latent distance from the prototype before push to this patch (how far push moved it).
        epoch: Training epoch at whose start the push ran.
        pruned: Why the prototype was pruned afterwards (``None`` while it is active).
    """

    sample_id: str
    sample_index: int
    label: int
    feature_index: list[int]
    feature_size: list[int]
    image_center: list[float]
    image_box: list[list[int]]
    distance: float
    epoch: int = -1
    pruned: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return asdict(self)


@dataclass
class PushCandidates:
    """What push compares prototypes against, for one batch.

    Attributes:
        distances: (B, P, N) distance of each prototype to each of N candidates per image.
        vectors: (B, P or 1, N, D) the candidate latent vectors (1 on axis 1 when shared by every prototype).
        feature_index: (B, P, N) flat feature-map location of each candidate; ``None`` means candidate ``n``
            sits at flat location ``n``.
        feature_size: Spatial size ``*s`` of the feature map.
    """

    distances: Tensor
    vectors: Tensor
    feature_size: tuple[int, ...]
    feature_index: Tensor | None = None


class PrototypeLayer(nn.Module):
    """Prototype vectors, their classes, distances/similarities and their provenance.

    Args:
        channels: Latent channels ``D``.
        prototype_classes: Class of each prototype (length ``P``).
        num_classes: Classes ``K``.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (distance ``1 - cos``, scale-free).
        epsilon: The ``eps`` of the log similarity.
    """

    def __init__(self, channels: int, prototype_classes: Sequence[int], num_classes: int,
                 metric: PrototypeMetric = "l2", epsilon: float = 1e-4) -> None:
        super().__init__()
        if metric not in ("l2", "cosine"):
            raise ValueError(f"prototype metric must be 'l2' or 'cosine', got {metric!r}")
        if not epsilon > 0:
            raise ValueError(f"prototype epsilon must be > 0, got {epsilon!r}")
        classes = torch.as_tensor(list(prototype_classes), dtype=torch.long)
        if classes.numel() == 0 or int(classes.min()) < 0 or int(classes.max()) >= num_classes:
            raise ValueError(f"prototype_classes must be non-empty class indices in [0, {num_classes}), "
                             f"got {classes.tolist()}")
        self.metric, self.epsilon = metric, float(epsilon)
        self.vectors = nn.Parameter(torch.rand(classes.numel(), channels))  # uniform [0, 1], as in the paper
        self.register_buffer("class_identity", F.one_hot(classes, num_classes).float())  # (P, K)
        self.register_buffer("active", torch.ones(classes.numel(), dtype=torch.bool))  # False once pruned
        self.sources: list[PrototypeSource | None] = [None] * classes.numel()

    @property
    def num_prototypes(self) -> int:
        """``P``."""
        return self.vectors.shape[0]

    @property
    def prototype_classes(self) -> Tensor:
        """(P,) class index of each prototype."""
        return self.class_identity.argmax(dim=1)

    def distances(self, features: Tensor) -> Tensor:
        """(B, D, *s) latent patches -> (B, P, *s) distance of every prototype to every patch."""
        if self.metric == "cosine":
            cosine = torch.einsum("bd...,pd->bp...", F.normalize(features, dim=1), F.normalize(self.vectors, dim=1))
            return (1.0 - cosine).clamp_min(0.0)
        squared_features = features.pow(2).sum(dim=1, keepdim=True)
        cross = torch.einsum("bd...,pd->bp...", features, self.vectors)
        squared_prototypes = self.vectors.pow(2).sum(dim=1).view(1, -1, *([1] * (features.ndim - 2)))
        return F.relu(squared_features - 2.0 * cross + squared_prototypes)  # relu: rounding can go below 0

    def smallest_distances(self, features: Tensor) -> Tensor:
        """(B, D, *s) latent patches -> (B, P) distance of every prototype to its nearest patch (min-pooling).

        Equal, value and gradient, to ``distances(features).flatten(2).min(dim=2).values`` without building the
        maps: the minimum over the patches of the unclamped :meth:`patch_distances` (ties: the first patch, as
        before), then the clamp at 0, which commutes with the minimum and passes no gradient where it clamps.
        Autograd keeps the inputs and the minima's indices, no full-size tensor.
        """
        smallest = self._located(features, clamp=False).min(dim=1).values
        return smallest.clamp_min(0.0) if self.metric == "cosine" else F.relu(smallest)

    def patch_distances(self, features: Tensor) -> Tensor:
        """(B, D, *s) latent patches -> (B, N, P) distance of every prototype to each of the N patches (row-major).

        The values of :meth:`distances` bit for bit, laid out patch-major (what push reduces over), in one tensor.
        """
        return self._located(features, clamp=True)

    def _located(self, features: Tensor, clamp: bool) -> Tensor:
        """(B, N, P) distances in one full-size tensor: one matrix product over every patch of the batch.

        L2: the product with the prototypes times -2 gives ``-2 z.p`` (scaling by a power of two is exact);
        ``||z||^2`` and ``||p||^2`` are added in place (IEEE addition commutes and ``a - b`` is ``a + (-b)``, so the
        sums are bit for bit those of :meth:`distances`). Cosine: the product with the negated unit prototypes plus 1
        is ``1 - cos``. In-place updates touch the product's own result, never a view of it, so autograd keeps no
        copies; ``clamp`` sets values below 0 (rounding) to 0 as :meth:`distances` does.
        """
        batch, channels = features.shape[:2]
        if self.metric == "cosine":
            patches = F.normalize(features, dim=1).flatten(2).transpose(1, 2).reshape(1, -1, channels)
            located = torch.bmm(patches, F.normalize(self.vectors, dim=1).neg().t().unsqueeze(0)).add_(1.0)
            located = located.clamp_min_(0.0) if clamp else located
            return located.view(batch, -1, self.num_prototypes)
        patches = features.flatten(2).transpose(1, 2).reshape(1, -1, channels)  # (1, B * N, D)
        squared_features = _SquaredNorms.apply(patches, features)  # (1, B * N, 1)
        located = torch.bmm(patches, (-2.0 * self.vectors).t().unsqueeze(0))  # (1, B * N, P)
        squared_prototypes = self.vectors.pow(2).sum(dim=1).view(1, 1, -1)
        if located.dtype == squared_features.dtype == squared_prototypes.dtype:
            located = located.add_(squared_features).add_(squared_prototypes)
        else:  # autocast: a lower-precision product is promoted, as ``||z||^2 - 2 z.p + ||p||^2`` would be
            located = squared_features + located + squared_prototypes
        located = F.relu(located, inplace=True) if clamp else located
        return located.view(batch, -1, self.num_prototypes)

    def paired_distances(self, pooled: Tensor) -> Tensor:
        """(B, P, D) one vector per prototype -> (B, P) distance of each prototype to its own vector."""
        if self.metric == "cosine":
            return (1.0 - F.cosine_similarity(pooled, self.vectors.unsqueeze(0), dim=-1)).clamp_min(0.0)
        return (pooled - self.vectors.unsqueeze(0)).pow(2).sum(dim=-1)

    def mutual_distances(self) -> Tensor:
        """(P, P) distance between every two prototypes, in the layer's metric."""
        if self.metric == "cosine":
            unit = F.normalize(self.vectors, dim=1)
            return (1.0 - unit @ unit.t()).clamp_min(0.0)
        return torch.cdist(self.vectors, self.vectors).pow(2)

    def similarity(self, distances: Tensor) -> Tensor:
        """``log((d + 1) / (d + eps))``: large for small distances, decreasing, >= 0."""
        return torch.log((distances + 1.0) / (distances + self.epsilon))

    @torch.no_grad()
    def project(self, vectors: Tensor, sources: Sequence[PrototypeSource | None]) -> None:
        """Replace prototype ``p`` by ``vectors[p]`` wherever ``sources[p]`` is given (push)."""
        if vectors.shape != self.vectors.shape or len(sources) != self.num_prototypes:
            raise ValueError(f"project: expected vectors of shape {tuple(self.vectors.shape)} and "
                             f"{self.num_prototypes} sources, got {tuple(vectors.shape)} and {len(sources)}")
        for index, source in enumerate(sources):
            if source is not None:
                self.vectors[index] = vectors[index].to(self.vectors)
                self.sources[index] = source

    def get_extra_state(self) -> dict[str, Any]:
        """Provenance as plain values (saved in ``state_dict`` and checkpoints)."""
        return {"version": _EXTRA_STATE_VERSION, "metric": self.metric,
                "sources": [None if s is None else s.to_dict() for s in self.sources]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore provenance saved by :meth:`get_extra_state`."""
        sources = state.get("sources")
        if not isinstance(sources, list) or len(sources) != self.num_prototypes:
            found = f"{len(sources)} sources" if isinstance(sources, list) else type(sources).__name__
            raise ValueError(f"prototype layer extra state: expected {self.num_prototypes} sources, got {found}")
        self.sources = [None if s is None else PrototypeSource(**s) for s in sources]


class _SquaredNorms(torch.autograd.Function):
    """``||z||^2`` of every latent patch, summed over the channels of the (B, D, *s) features as it always was.

    The gradient goes to the (1, B * N, D) patches of the matrix product instead of the features, so the latent
    patches get one gradient, in the layout they always had, instead of two in different layouts (whose sum is a slow
    strided addition). Its values are those of ``pow(2).sum()``'s backward: ``grad * (2 * z)``.
    """

    @staticmethod
    def forward(ctx: Any, patches: Tensor, features: Tensor) -> Tensor:
        ctx.save_for_backward(patches)
        return features.detach().pow(2).sum(dim=1, keepdim=True).reshape(1, -1, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (patches,) = ctx.saved_tensors
        return grad * (2.0 * patches), None


def add_on_layers(spatial_dims: int, in_channels: int, channels: int) -> nn.Sequential:
    """ProtoPNet's add-on: 1x1 convolution, ReLU, 1x1 convolution, sigmoid (latent patches in [0, 1]^D)."""
    conv = Conv[Conv.CONV, spatial_dims]
    return nn.Sequential(conv(in_channels, channels, kernel_size=1), nn.ReLU(),
                         conv(channels, channels, kernel_size=1), nn.Sigmoid())

