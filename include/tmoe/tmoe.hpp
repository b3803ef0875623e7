#pragma once
/// @file tmoe.hpp
/// @brief Umbrella header for .cpp files: core, the CPU back-end, the MoE layer and safetensors I/O.
///
/// @code
/// #include <tmoe/tmoe.hpp>
/// using Cfg = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<8>, tmoe::TopK<2>, tmoe::CapacityFactor<5, 4>>;
/// tmoe::CpuContext ctx{2};
/// tmoe::moe::Layer<Cfg, float, tmoe::Cpu> layer({.d_model = 512, .d_ff = 2048});
/// @endcode
///
/// Never includes a CUDA header; CUDA users include <tmoe/cuda.cuh> from .cu files.

#include "tmoe/config.hpp"
#include "tmoe/version.hpp"

#include "tmoe/core/bf16.hpp"
#include "tmoe/core/device.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/f16.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/ops.hpp"
#include "tmoe/core/random.hpp"
#include "tmoe/core/shape.hpp"
#include "tmoe/core/storage.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/core/tensor_view.hpp"

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/backend/cpu/ops.hpp"

#include "tmoe/nn/activation.hpp"
#include "tmoe/nn/parameter.hpp"

#include "tmoe/nn/attention.hpp"
#include "tmoe/nn/dropout.hpp"
#include "tmoe/nn/embedding.hpp"
#include "tmoe/nn/feed_forward.hpp"
#include "tmoe/nn/init.hpp"
#include "tmoe/nn/layer_norm.hpp"
#include "tmoe/nn/linear.hpp"
#include "tmoe/nn/positional.hpp"
#include "tmoe/nn/blocks.hpp"
#include "tmoe/nn/stack.hpp"
#include "tmoe/nn/transformer.hpp"

#include "tmoe/io/dtype.hpp"
#include "tmoe/io/safetensors.hpp"
#include "tmoe/io/state_dict.hpp"
#include "tmoe/io/model_config.hpp"
#include "tmoe/io/model_file.hpp"

#include "tmoe/data/batching.hpp"
#include "tmoe/data/corpus.hpp"
#include "tmoe/data/synthetic.hpp"
#include "tmoe/decode/search.hpp"
#include "tmoe/eval/bleu.hpp"
#include "tmoe/eval/chrf.hpp"
#include "tmoe/eval/text.hpp"
#include "tmoe/extract/expert_usage.hpp"
#include "tmoe/extract/subnetwork.hpp"

#include "tmoe/moe/config.hpp"
#include "tmoe/moe/experts.hpp"
#include "tmoe/moe/gate.hpp"
#include "tmoe/moe/layer.hpp"
#include "tmoe/moe/router.hpp"
#include "tmoe/moe/routing_plan.hpp"

#include "tmoe/train/adafactor.hpp"
#include "tmoe/train/adamw.hpp"
#include "tmoe/train/checkpoint.hpp"
#include "tmoe/train/clip.hpp"
#include "tmoe/train/loss.hpp"
#include "tmoe/train/optimizer_state.hpp"
#include "tmoe/train/schedule.hpp"
