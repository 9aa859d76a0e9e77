// Everything custom_bn offers to C++: link custom_bn::custom_bn and include this header.
#pragma once

#include <custom_bn/fusion.h>
#include <custom_bn/nn.h>
#include <custom_bn/ops.h>
#include <custom_bn/result_cache.h>
#include <custom_bn/sync_batch_norm.h>
