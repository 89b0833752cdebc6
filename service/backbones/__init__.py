"""Backbones: the registry (`registry`), starting weights (`weights`), what differs
between architecture families (`family_rules`) and building a model (`building`), one API:

The backbone registry: every torchvision image-classification model, with the
metadata of its pretrained ImageNet-1K weights, read from torchvision itself.

A `BackboneSpec` per model name (`get_spec("resnet50")`, `list_specs(family=...)`)
holds one `WeightsSpec` per weights enum member: accuracy, parameter count, GFLOPs,
file size and preprocessing all come from the member's `meta` and `transforms()`,
never typed here, so they are as true as torchvision's own extended tests make
them. Specs are built lazily and cached; nothing here instantiates a model or
touches the network. Pretrained files live in a weights cache directory
(`Settings.weights_dir`) under the file name torchvision would download them to;
`load_pretrained_state_dict` reads from there only and says which file to
provision when one is missing. Conversion to the API's `Backbone` messages lives
next to the types (`BackboneSpec.to_proto`, `list_backbones_response`).

`build` makes a model to fine-tune: torchvision's architecture with its final
classifier cut (the trunk, images → features) and a new head for the target classes,
its weights from the cache, a file or an earlier tlserve model (chained transfer),
and its parameters split into named layer groups, bottom → top, that strategies
freeze and unfreeze (`layer_groups(name)` gives the names without building).

    spec = get_spec("resnet50")
    spec.default.preprocessing.crop_size        # 224
    weights = resolve_weights("resnet50", "IMAGENET1K_V1")
    state_dict = load_pretrained_state_dict(weights.enum, settings.weights_dir)
    built = build("resnet50", 5, weights=WeightsChoice("torchvision"), weights_dir=settings.weights_dir)
    [group.name for group in built.groups]      # stem, layer1, ..., layer4, head
"""

from __future__ import annotations

from tlserve.service.backbones.building import (  # noqa: F401 - the package's API
    BuiltModel,
    Classifier,
    LayerGroup,
    build,
    count_gflops,
    load_published,
    rebuild,
    trainable_groups,
)
from tlserve.service.backbones.family_rules import (  # noqa: F401 - the package's API
    layer_groups,
)
from tlserve.service.backbones.registry import (  # noqa: F401 - the package's API
    BackboneSpec,
    Preprocessing,
    UnknownBackbone,
    UnknownFamily,
    UnknownWeights,
    WeightsCacheError,
    WeightsHashMismatch,
    WeightsNotCached,
    WeightsSpec,
    backbone_names,
    families,
    family_of,
    get_spec,
    has_imagenet_classifier,
    list_backbones_response,
    list_specs,
    resolve_weights,
    weights_file_name,
)
from tlserve.service.backbones.weights import (  # noqa: F401 - the package's API
    WEIGHTS_KINDS,
    WeightsChoice,
    ensure_cached,
    load_pretrained_state_dict,
    weights_path,
)
