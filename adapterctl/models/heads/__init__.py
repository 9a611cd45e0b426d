from adapterctl.models.heads.fcn import FCNHead
from adapterctl.models.heads.upernet import UPerHead

__all__ = ["FCNHead", "UPerHead"]
