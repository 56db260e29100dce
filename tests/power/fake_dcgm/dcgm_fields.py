"""Fake ``dcgm_fields``: the field ids llmenergy uses (pre-4.6 names) and field metadata."""
from __future__ import annotations

import types

DCGM_FE_GPU = 1

DCGM_FI_DEV_SM_CLOCK = 100
DCGM_FI_DEV_MEM_CLOCK = 101
DCGM_FI_DEV_CLOCK_THROTTLE_REASONS = 112
DCGM_FI_DEV_GPU_TEMP = 150
DCGM_FI_DEV_POWER_USAGE = 155
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION = 156
DCGM_FI_DEV_POWER_USAGE_INSTANT = 157
DCGM_FI_DEV_POWER_MGMT_LIMIT = 160
DCGM_FI_DEV_POWER_MGMT_LIMIT_MIN = 161
DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX = 162
DCGM_FI_DEV_POWER_MGMT_LIMIT_DEF = 163
DCGM_FI_DEV_ENFORCED_POWER_LIMIT = 164
DCGM_FI_DEV_GPU_UTIL = 203
DCGM_FI_DEV_MEM_COPY_UTIL = 204
DCGM_FI_DEV_POWER_VIOLATION = 240
DCGM_FI_DEV_FB_TOTAL = 250
DCGM_FI_DEV_FB_FREE = 251
DCGM_FI_DEV_FB_USED = 252
DCGM_FI_PROF_SM_ACTIVE = 1002
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE = 1004
DCGM_FI_PROF_DRAM_ACTIVE = 1005

_TAGS = {v: k[len("DCGM_FI_"):].lower() for k, v in dict(globals()).items() if k.startswith("DCGM_FI_")}


def DcgmFieldGetById(fieldId):  # noqa: N802,N803 - vendor name
    tag = _TAGS.get(fieldId)
    return None if tag is None else types.SimpleNamespace(fieldId=fieldId, tag=tag)
