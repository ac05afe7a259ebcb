"""One thin Lightning callback per technique; the algorithms live in the technique packages."""

from lightning_segcompress.callbacks.device_benchmark import DeviceBenchmark
from lightning_segcompress.callbacks.knowledge_distillation import KnowledgeDistillation
from lightning_segcompress.callbacks.post_pruning import PostPruning
from lightning_segcompress.callbacks.protocol import CompressionCallback, CompressionEvent, CompressionProducer
from lightning_segcompress.callbacks.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_segcompress.callbacks.shunt_replacement import ShuntReplacement
from lightning_segcompress.callbacks.sparsity_regularization import SparsityRegularization
from lightning_segcompress.callbacks.structured_pruning import StructuredPruning

__all__ = ["CompressionCallback", "CompressionEvent", "CompressionProducer", "DeviceBenchmark", "KnowledgeDistillation",
           "PostPruning", "PostTrainingQuantization", "QuantizationAwareTraining", "ShuntReplacement",
           "SparsityRegularization", "StructuredPruning"]
