"""Networks of onfh-fl: VGG encoder, MR-to-CT translation U-Net, staging net, encoder transfer."""
