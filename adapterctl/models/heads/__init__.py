from adapterctl.models.heads.common import SemanticHead
from adapterctl.models.heads.fcn import FCNHead
from adapterctl.models.heads.upernet import UPerHead

__all__ = ["FCNHead", "SemanticHead", "UPerHead"]
