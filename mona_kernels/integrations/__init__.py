from .convert import convert, is_mona
from .timm import add_mona, adapter_state_dict, freeze_all_but_adapters, load_adapter_state_dict

__all__ = ["convert", "is_mona", "add_mona", "freeze_all_but_adapters", "adapter_state_dict",
           "load_adapter_state_dict"]
