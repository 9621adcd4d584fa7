#!/usr/bin/env bash
# The exact command that made the default tokenizer shipped in minillm/assets/tokenizer/.
#
# Corpora: ../shared/data (modern Chinese documentation, classical Chinese, English prose; third-party text that is
# NOT part of this repository). Each file contributes at most 4M characters, so the 23M-character classical corpus
# does not crowd out the 2.3M-character modern Chinese one. Then the compression per corpus is measured and
# written to scripts/default_tokenizer_compression.{json,md}.
#
#   bash scripts/train_default_tokenizer.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${1:-../shared/data}"

minillm tokenizer train \
  --data "$DATA_DIR/pretrain_zh_modern.parquet" \
  --data "$DATA_DIR/pretrain_zh_classical.parquet" \
  --data "$DATA_DIR/pretrain_en.parquet" \
  --vocab-size 32000 --max-chars-per-file 4000000 \
  --out minillm/assets/tokenizer --overwrite

python scripts/tokenizer_compression.py --tokenizer minillm/assets/tokenizer \
  --skip-chars 4000000 --out scripts/default_tokenizer_compression \
  "$DATA_DIR/pretrain_zh_modern.parquet" "$DATA_DIR/pretrain_zh_classical.parquet" "$DATA_DIR/pretrain_en.parquet"
