//! Shares sealed to their custodians: each share encrypted to one age X25519 recipient
//! (age-encryption.org/v1, with the `age` crate, rage's library) and returned ASCII-armored,
//! so that the share is in clear only inside this process and in its custodian's hands
//! (`age --decrypt -i key.txt share.age`).

use std::str::FromStr;

use age::x25519::Recipient;

use super::{SealError, Share, Zeroizing};

/// Parses one recipient per share (`age1...`), or none. A recipient is named by its
/// position, never echoed: the text is the caller's.
pub(crate) fn parse_recipients(texts: &[String], shares: u8) -> Result<Vec<Recipient>, SealError> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    if texts.len() != usize::from(shares) {
        return Err(SealError::RecipientCount {
            shares,
            recipients: texts.len(),
        });
    }
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            Recipient::from_str(text.trim()).map_err(|reason| SealError::BadRecipient {
                position: i + 1,
                reason,
            })
        })
        .collect()
}

/// The shares in custodian text form, each encrypted to its recipient when there are
/// recipients (then ASCII-armored age files).
pub(super) fn share_texts(
    shares: &[Share],
    recipients: &[Recipient],
) -> Result<Vec<Zeroizing<String>>, SealError> {
    if recipients.is_empty() {
        return Ok(shares.iter().map(Share::to_text).collect());
    }
    shares
        .iter()
        .zip(recipients)
        .map(|(share, recipient)| {
            let mut text = share.to_text();
            text.push('\n');
            age::encrypt_and_armor(recipient, text.as_bytes())
                .map(Zeroizing::new)
                .map_err(|_| SealError::ShareSealing)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn each_share_opens_with_its_own_identity_only() {
        let ids: Vec<_> = (0..3).map(|_| age::x25519::Identity::generate()).collect();
        let texts: Vec<String> = ids.iter().map(|i| i.to_public().to_string()).collect();
        let recipients = parse_recipients(&texts, 3).unwrap();
        let (_, shares) = kms_unseal::split(&[7u8; 32], 3, 2).unwrap();
        let sealed = share_texts(&shares, &recipients).unwrap();
        for (i, armored) in sealed.iter().enumerate() {
            assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
            assert!(!armored.contains("kms1-"));
            let opened = age::decrypt(&ids[i], armored.as_bytes()).unwrap();
            let opened = String::from_utf8(opened).unwrap();
            assert_eq!(opened.trim(), &**shares[i].to_text());
            let other = &ids[(i + 1) % 3];
            assert!(age::decrypt(other, armored.as_bytes()).is_err());
        }
    }

    #[test]
    fn recipients_are_counted_and_checked_by_position() {
        let good = age::x25519::Identity::generate().to_public().to_string();
        assert!(parse_recipients(&[], 3).unwrap().is_empty());
        assert!(matches!(
            parse_recipients(&[good.clone(), good.clone()], 3),
            Err(SealError::RecipientCount {
                shares: 3,
                recipients: 2
            })
        ));
        let bad = vec![good.clone(), "age1<script>".to_owned(), good];
        let err = parse_recipients(&bad, 3).unwrap_err();
        assert!(matches!(err, SealError::BadRecipient { position: 2, .. }));
        assert!(!err.to_string().contains("<script>"), "{err}");
        let ssh = vec!["ssh-ed25519 AAAA".to_owned(); 2];
        assert!(matches!(
            parse_recipients(&ssh, 2),
            Err(SealError::BadRecipient { position: 1, .. })
        ));
    }
}
