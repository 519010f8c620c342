"""Model references: "torchvision:NAME" strings that name an architecture.

Save files record the reference so load() can rebuild the architecture on its
own. Weights are never downloaded: models are built with random init and
users load their own weights.
"""
import difflib
import inspect

REF_ATTR = "_hsvkernels_ref"  # set on models built here, so save() can record where they came from


def build(ref):
    """A freshly initialised model for `ref` ("torchvision:resnet18"); ValueError if unknown."""
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError("model reference must look like 'torchvision:NAME', got %r" % (ref,))
    source, name = ref.split(":", 1)
    if source != "torchvision":
        raise ValueError("unknown model source %r in %r; only 'torchvision:NAME' is supported" % (source, ref))
    try:
        import torchvision
    except ImportError as exc:
        raise ValueError("%r needs torchvision, which is not installed (%s)" % (ref, exc)) from None
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = "; did you mean %s?" % ", ".join(close) if close else "; see torchvision.models.list_models()"
        raise ValueError("unknown torchvision model %r%s" % (name, hint))
    builder = torchvision.models.get_model_builder(name)
    # Segmentation and detection builders default their backbone to ImageNet weights (a download).
    no_backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    model = builder(weights=None, **no_backbone)
    setattr(model, REF_ATTR, ref)
    return model


def ref_of(model):
    """The reference a model was built from, or None."""
    return getattr(model, REF_ATTR, None)
