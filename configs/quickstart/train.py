"""A tiny 'training' job for the quickstart: a nearest-centroid classifier
over 8x8 grey images stored as CSV. It reads its inputs from the paths mountd
gives it and writes a model and metrics to its output directory."""

import argparse
import csv
import json
import os
import time


def load_image(path):
    with open(path, encoding="utf-8") as f:
        return [float(v) for row in csv.reader(f) for v in row]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True, help="directory of img_*.csv (a mount)")
    parser.add_argument("--labels", required=True, help="labels.csv (a download)")
    parser.add_argument("--out", required=True, help="output directory (uploaded after exit)")
    args = parser.parse_args()
    epochs = int(os.environ.get("EPOCHS", "1"))

    with open(args.labels, encoding="utf-8") as f:
        labels = {row["image"]: row["label"] for row in csv.DictReader(f)}
    print(f"train: {len(labels)} labelled images under {args.images}, {epochs} epochs", flush=True)

    centroids = {}
    for epoch in range(1, epochs + 1):
        start = time.time()
        sums, counts = {}, {}
        for name in sorted(os.listdir(args.images)):
            pixels = load_image(os.path.join(args.images, name))
            label = labels[name]
            acc = sums.setdefault(label, [0.0] * len(pixels))
            for i, v in enumerate(pixels):
                acc[i] += v
            counts[label] = counts.get(label, 0) + 1
        centroids = {lab: [v / counts[lab] for v in acc] for lab, acc in sums.items()}
        print(f"train: epoch {epoch}: {sum(counts.values())} images in {time.time() - start:.3f} s", flush=True)

    def predict(pixels):
        return min(centroids, key=lambda lab: sum((a - b) ** 2 for a, b in zip(pixels, centroids[lab])))

    correct = sum(predict(load_image(os.path.join(args.images, n))) == lab for n, lab in labels.items())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model.json"), "w", encoding="utf-8") as f:
        json.dump(centroids, f)
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"train_accuracy": correct / len(labels), "epochs": epochs}, f)
    print(f"train: accuracy {correct}/{len(labels)}; wrote model.json and metrics.json to {args.out}", flush=True)


if __name__ == "__main__":
    main()
