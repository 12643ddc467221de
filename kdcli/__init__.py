__version__ = "0.1.0"

# Register the cifar_* networks with timm, so that `import kdcli` is all plain timm code needs to build or load
# them (timm.create_model("cifar_resnet8"), timm.create_model("local-dir:RUN_FOLDER", pretrained=True)).
import kdcli.models.cifar  # noqa: E402, F401  (after __version__: kdcli.models reads it)
