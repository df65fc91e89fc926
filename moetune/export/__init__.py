"""What a trained adapter becomes: merged into the base (`merge`), several LoRAs merged into one
(`multimerge`), a routed adapter collapsed into a stock one (`collapse`), the stock-loading snippet
of the model card (`stock`)."""
