"""From what a user sent to prompt token ids: the model's Jinja chat template (`chat_template`) and
the one path every front end uses to build a prompt (`build`)."""
