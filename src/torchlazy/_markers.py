"""Names of the attributes torchlazy writes on torch objects, all with one prefix.

Each marker is removed when the thing it marks is done (a storage materialized,
a lazy layer built), so a finished model carries none of them.
"""

from __future__ import annotations

PREFIX = "_torchlazy_"

# on a fake storage: (record, storage id) of the deferred construction that made it
RECORD = PREFIX + "record"
# on a module: {name: recorded tensor} for the parameters it registered under `deferred()`
ORIGIN = PREFIX + "origin"
# on a module: True while a forward pre-hook refuses its forward before materialization
GUARD = PREFIX + "guard"
# on a lazy placeholder parameter: (weakref to its module, its name there)
WHERE = PREFIX + "where"
# on a lazy module made under `deferred()`: (record, key) of its place in construction order
SLOT = PREFIX + "slot"
# on a lazy module: its rank in construction order (where its draws come in the RNG stream)
ORDER = PREFIX + "order"
# on a deep copy of an unbuilt lazy module: the module it copies (built first, then copied: eager's copy of a
# layer carries that layer's values, as `nn.TransformerEncoder` clones its layer)
SOURCE = PREFIX + "source"
# on a `tl.LazyModule`: the forward pre-hook handle that runs `build` at the first call
BUILD_HOOK = PREFIX + "build_hook"
