"""Prediction: whole-image and sliding-window inference, evaluation (confusion matrix, IoU), reports and the summary of every evaluation."""
