//! Who a TLS client is: the host name in its certificate.

use x509_parser::extensions::GeneralName;

/// The host identity a client certificate (DER) names: its first DNS subjectAltName, or else
/// its subject common name.
pub fn from_cert(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                return Ok((*n).to_owned());
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(str::to_owned);
    cn.ok_or_else(|| "the client certificate names no host (no DNS subjectAltName, no common name)".to_owned())
}
