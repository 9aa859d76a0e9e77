"""torch.ao.quantization with custom_bn's modules in place of torch's (the integration is
custom_bn.integrations.quantization; this module is its public face, imported on first use).

- `FUSER_METHOD_MAPPING`: every eager fusion torch defines for its batch norm, for ours, to
  pass as `fuse_custom_config_dict={"additional_fuser_method_mapping": ...}` (`fuse_modules`
  finds them without it once custom_bn is imported);
- `get_backend_config(base)`: `base` (torch's native config by default) with ours added, to
  pass as `backend_config=` to prepare_fx, prepare_qat_fx and convert_fx.
"""

from .integrations.quantization import fuser_method_mapping, get_backend_config

FUSER_METHOD_MAPPING = fuser_method_mapping()

__all__ = ["FUSER_METHOD_MAPPING", "get_backend_config"]
