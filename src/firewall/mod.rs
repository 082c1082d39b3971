//! TEMP stub until the firewall branch merges.
use std::net::IpAddr;
use std::time::Duration;
#[derive(Clone)]
pub struct Admitter;
#[derive(Debug)]
pub struct AdmitError;
impl std::fmt::Display for AdmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("x")
    }
}
impl Admitter {
    pub async fn admit(
        &self,
        _client: IpAddr,
        _addrs: &[(IpAddr, Duration)],
    ) -> Result<(), AdmitError> {
        Ok(())
    }
}
pub struct Firewall;
impl Firewall {
    pub fn install(_p: &crate::policy::Policy) -> Result<Firewall, AdmitError> {
        Ok(Firewall)
    }
    pub fn admitter(&self) -> Admitter {
        Admitter
    }
    pub fn shutdown(self) -> Result<(), AdmitError> {
        Ok(())
    }
}
pub fn render_nft(_p: &crate::policy::Policy) -> String {
    String::new()
}
